"""Random tiny HF `Phi3ForCausalLM` models (torch, CPU, float32) for parity tests.

Weights are redrawn with unit-scale statistics (std 1/sqrt(fan_in), norms 1 + noise) so that
logits are O(1): with HF's 0.02 init every logit is ~0 and a wrong weight mapping could hide
under the tolerance.
"""

import numpy as np

from phimr_jax.model.config import ModelConfig


def make_hf_model(cfg: ModelConfig, seed: int = 0, rope_format: str = "legacy"):
    import torch
    import transformers

    hf_cfg = transformers.Phi3Config(**cfg.to_hf_dict(rope_format=rope_format))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    return model


def hf_logits(model, ids, positions=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {}
        if positions is not None:
            kwargs["position_ids"] = torch.tensor(np.array(positions), dtype=torch.long)
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def random_factors(rng: np.random.Generator, n: int, hi: float) -> tuple:
    """A monotone non-trivial factor list like Phi-4-mini's, random per test config."""
    return tuple(float(x) for x in np.sort(rng.uniform(1.0, hi, size=n)))
