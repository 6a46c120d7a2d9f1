"""Probe: what does a purely reactive policy win when it knows whether its next hop is safe?

A ceiling, NOT an agent: it cheats by cloning the emulator's state. Each step it tries every action
(then no-ops) for `horizon` steps in copies of the game, takes a win if one is in reach, else hops
UP if that survives, else the first of none, DOWN, RIGHT, LEFT that survives. It plays the held-out
levels of evaluate.py (same seed, same levels) beside always-UP. ~1 s per episode.

    python docs/probe_lookahead.py --distribution-mode easy --episodes 200
"""
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTION_NAMES, ACTIONS, NONE, cli, make_env  # noqa: E402
from evaluate import Always, EvalConfig, play, summarize  # noqa: E402


@dataclass
class LookaheadConfig:
    distribution_mode: str = "easy"  # game mode
    episodes: int = 200  # held-out levels, the first ones of evaluate.py's test stream
    seed: int = EvalConfig.seed  # evaluate.py's test level stream
    horizon: int = 8  # steps looked ahead after each tried action


def lookahead(distribution_mode, horizon=8):
    """The ceiling as a policy for evaluate.play (which binds it to the env it plays, to clone)."""
    order = [ACTION_NAMES.index(a) for a in ("UP", "NONE", "DOWN", "RIGHT", "LEFT")]  # action indices
    A, p = len(ACTIONS), SimpleNamespace(env=None, sim=None)

    def act(obs, first, alive=None):
        n = len(obs)
        if p.sim is None:
            p.sim = make_env(n * A, distribution_mode)  # its levels are overwritten by set_state
        p.sim.set_state([s for s in p.env.get_state() for _ in range(A)])  # env i -> sims i*A .. i*A+A-1
        tried = np.tile(np.arange(A), n)  # (n*A,)
        ended, dead, won = (np.zeros(n * A, dtype=bool) for _ in range(3))
        for t in range(horizon):
            p.sim.act(ACTIONS[tried if t == 0 else np.full(n * A, NONE)])
            rew, _, first_sim = p.sim.observe()
            won |= ~ended & (rew > 0)
            dead |= ~ended & first_sim & (rew <= 0)  # an episode that ends without the prize: a death
            ended |= first_sim
        won, safe = won.reshape(n, A), ~dead.reshape(n, A)  # (n,A)
        pick = [int(np.flatnonzero(w)[0]) if w.any() else next((a for a in order if s[a]), NONE)
                for w, s in zip(won, safe)]
        return ACTIONS[np.array(pick)]
    return SimpleNamespace(reset=lambda num_envs: None, act=act, bind=lambda env: setattr(p, "env", env))


if __name__ == "__main__":
    cfg = cli(LookaheadConfig)
    for name, policy in (("look-ahead", lookahead(cfg.distribution_mode, cfg.horizon)), ("always-UP", Always())):
        r = summarize(*play(policy, cfg.episodes, cfg.seed, cfg.distribution_mode, desc=name))
        print(f"{name:<10} {cfg.distribution_mode}, {r['episodes']} held-out levels: {r['win_rate']:.1%} wins "
              "[{:.1%}, {:.1%}]".format(*r["ci95"]) + f", mean length {r['mean_length']:.1f}")
