"""Probe: does "this UP kills" hold on the agent's own UPs, not only on the UPs of hop-then-wait play?

M's hop head and D are scored (README, "Does the world model know what kills?") on UPs made after 5-12 no-ops,
as they were trained. The agent does not wait: once an UP is called safe, the frog hops again as soon as it
lands. Here the rule C starts from, "UP iff the logit < 0, else no-op" (M's hop head's, or D's with --driver d),
plays held-out levels, pressing UP anyway with probability --explore so that deadly UPs are sampled too. Each UP
is labelled as M's training labels a move: deadly iff the episode ended without the prize before the next UP
(and within --window steps). Printed: the AUC of M's hop head and of D on these UPs, split by how many steps
before it the last UP came (1: a hop straight after a hop, as the agent plays; 5 or more: as the probe's).

    python docs/probe_on_policy.py --run RUN --episodes 500
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, MAX_STEPS, NONE, UP, check_flags, cli, fail  # noqa: E402
from danger import auc, load_danger  # noqa: E402
from evaluate import play  # noqa: E402
from mdnrnn import load_mdnrnn  # noqa: E402
from vae import load_vae, to_input  # noqa: E402


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding vae.pt, mdnrnn.pt (with its hop head) and, if there, danger.pt
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty of the levels
    driver: Literal["m", "d"] = "m"  # whose rule plays: M's hop head's or D's
    episodes: int = 500  # held-out levels
    explore: float = 0.2  # probability of an UP whatever the rule says (deadly UPs get sampled)
    window: int = 5  # a death more than this many steps after the UP is not the UP's
    seed: int = 1_000_003  # level stream (evaluate.py's held-out one); also seeds the exploration

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1, window=1))
        if not 0 <= self.explore <= 1:
            fail(f"--explore {self.explore}: expected a probability in [0, 1]")


class Rule:
    """ "UP iff the driver's logit < 0, else no-op", UP anyway with probability explore; records every UP as
    (env, step, M's logit, D's logit or nan, steps since the env's last UP)."""

    def __init__(self, vae, mdn, danger, driver, explore, seed):
        self.vae, self.mdn, self.danger, self.driver = vae, mdn, danger, driver
        self.explore, self.rng = explore, np.random.default_rng(seed)

    def reset(self, n):
        self.z_last, self.last, self.t = torch.zeros(n, self.vae.z_dim), None, 0  # (n,Z) V's z of the last frame
        self.since, self.ups = np.full(n, MAX_STEPS), []  # (n,) no UP yet: an episode's first UP counts as "5+"

    @torch.no_grad()
    def act(self, obs, first, alive):
        idx, first = np.flatnonzero(alive), np.asarray(first, dtype=bool)
        last, self.last = np.where(first[:, None, None, None], obs, obs if self.last is None else self.last), obs
        z = self.vae.encode(to_input(obs[idx]))[0]  # (n,Z)
        z_last = torch.where(torch.from_numpy(first[idx])[:, None], z, self.z_last[idx])  # a new level: no motion
        self.z_last[idx] = z
        m = self.mdn.hop(z, z_last, torch.full((len(idx),), UP)).numpy()  # (n,)
        d = self.danger(obs[idx], last[idx]).numpy() if self.danger is not None else np.full(len(idx), np.nan)
        up = ((d if self.driver == "d" else m) < 0) | (self.rng.random(len(idx)) < self.explore)  # (n,)
        self.since[idx] += 1  # now: steps since the env's last UP
        self.ups += [(i, self.t, m[j], d[j], self.since[i]) for j, i in enumerate(idx) if up[j]]
        self.since[idx[up]] = 0
        self.t += 1
        actions = np.full(len(obs), ACTIONS[NONE])
        actions[idx[up]] = ACTIONS[UP]
        return actions


def deadly(env, t, ret, length, window):
    """Which UPs killed: env, t (U,) each UP's env and step, in the order of play; ret, length (E,) each env's
    episode. An UP killed iff it was its env's last, and the episode ended without the prize before the cap and
    less than `window` steps after it (as M's hop labels: died before the next move). -> bool (U,)."""
    died = (ret <= 0) & (length < MAX_STEPS)  # (E,)
    final = np.zeros(len(env), dtype=bool)  # (U,) the env's last UP: only it can be the one the frog died of
    final[list({e: k for k, e in enumerate(env)}.values())] = True  # a dict keeps each env's latest index
    return final & died[env] & (length[env] - 1 - t < window)


def share(x):
    """The mean of a boolean array; nan for an empty one (a row without UPs), without numpy's warning."""
    return x.mean() if len(x) else float("nan")


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    d_path = os.path.join(cfg.run, "danger.pt")
    danger = load_danger(d_path) if os.path.exists(d_path) else None
    if mdn.hop is None or (cfg.driver == "d" and danger is None):
        fail(f"--run {cfg.run}: needs mdnrnn.pt with a hop head (--hop-steps > 0)"
             + (" and danger.pt (--driver d)" if cfg.driver == "d" else ""))
    rule = Rule(vae, mdn, danger, cfg.driver, cfg.explore, cfg.seed)
    ret, length = play(rule, cfg.episodes, cfg.seed, cfg.distribution_mode, desc="on-policy UPs")
    env, t, m, d, since = (np.array(c) for c in zip(*rule.ups))  # (U,) each, in the order of play
    y = deadly(env, t, ret, length, cfg.window)  # (U,)
    print(f"{cfg.run}: {cfg.episodes} {cfg.distribution_mode} levels, {cfg.driver.upper()}'s rule + {cfg.explore:.0%}"
          f" UPs anyway: win {np.mean(ret > 0):.1%}, {len(y)} UPs, {y.mean():.1%} deadly")
    print("AUC of each logit, and the share of the deadly UPs it called safe (< 0: the rule hops)")
    print(f"{'last UP':<14} {'UPs':>6} {'deadly':>7} {'M hop head':>11} {'let through':>11} {'D':>6} {'let through':>11}")
    for name, k in [("1 step before", since == 1), ("2-4 steps", (since >= 2) & (since <= 4)),
                    ("5+ steps", since >= 5), ("all", since >= 0)]:
        kill = k & y  # (U,) the deadly UPs of the row
        print(f"{name:<14} {k.sum():>6} {share(y[k]):>7.1%} {auc(m[k], y[k]):>11.3f} {share(m[kill] < 0):>11.1%} "
              f"{auc(d[k], y[k]):>6.3f} {share(d[kill] < 0):>11.1%}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
