"""Policy + learned value model for PPO (stage 4 with `rl.algorithm=ppo`).

The critic is a second Phi3 decoder initialised as a copy of the policy (as in InstructGPT /
OpenRLHF-style PPO: the value model starts from the policy's weights, not from random), with a
scalar value head on its final hidden states, zero-initialised so the first value estimates are
0 and the first advantages are the plain returns. Both are trained by one optimizer in one
jitted step; their parameters sit side by side in one tree: {"policy": ..., "critic": ...,
"value_head": [hidden]}.

`PARAM_LAYOUTS` names how a run's saved "params" tree is laid out, so any later reader (eval,
export, the next stage) can rebuild the target tree from the run's `run_info` and take the
policy out of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phimr_jax.model.phi3 import Phi3ForCausalLM, abstract_model


class ActorCritic(nnx.Module):
    """`policy` (the model being trained) and `critic` (a value model with `value_head`)."""

    def __init__(self, policy: Phi3ForCausalLM, critic: Phi3ForCausalLM, value_head: jax.Array):
        self.policy = policy
        self.critic = critic
        self.value_head = nnx.Param(value_head, logical_axes=("norm",))

    @property
    def config(self):
        return self.policy.config

    def values(self, input_ids, positions=None, segment_ids=None, *, long_rope=None):
        """Value estimate after each input token: [batch, seq] float32."""
        h = self.critic.hidden_states(input_ids, positions, segment_ids, long_rope=long_rope)
        return jnp.einsum("btd,d->bt", h.astype(jnp.float32),
                          self.value_head[...].astype(jnp.float32))

    @classmethod
    def from_policy(cls, policy: Phi3ForCausalLM) -> "ActorCritic":
        """Critic = a copy of the policy's weights (new buffers, same shardings)."""
        graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        # New Variables either way (merging the policy's own would share them, and the critic
        # would vanish from the parameter tree); new buffers too when concrete.
        copied = jax.tree.map(lambda x: x, params) if abstract else \
            jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
        critic = nnx.merge(graphdef, copied, rest)
        dim = policy.config.hidden_size
        head = jax.ShapeDtypeStruct((dim,), jnp.float32) if abstract else \
            jnp.zeros((dim,), jnp.float32)
        return cls(policy, critic, head)


def _same(module):
    return module


# layout name -> (build the trained module from a policy model, take the policy back out).
PARAM_LAYOUTS = {
    "policy": (_same, _same),
    "actor_critic": (ActorCritic.from_policy, lambda module: module.policy),
}


def abstract_for_layout(config, layout: str):
    """The abstract trained module of a run with this layout."""
    build, _ = PARAM_LAYOUTS[layout]
    return build(abstract_model(config))
