"""Probe: how does C's start point lose? "UP iff the danger logit < thr, else wait", read from D (pixels) or
from M's hop head (V's z), on the same held-out levels: wins, deaths within a hop (5 steps) of an UP (the UP
was called safe and was not), deaths while waiting longer (the frog stood in a lane or on a log too long),
and timeouts at the game's 500-step cap. No search: this is the rule CMA-ES starts from (danger.start_point),
played by controller.Agent itself, and most of the trained agent's skill (README).

    python docs/probe_rules.py --run runs --episodes 1000 --thresholds=0,-1.5
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, MAX_STEPS, UP, check_flags, cli, fail  # noqa: E402
from controller import Agent, input_sizes  # noqa: E402
from danger import load_danger, start_point  # noqa: E402
from evaluate import play  # noqa: E402
from mdnrnn import load_mdnrnn  # noqa: E402
from vae import load_vae  # noqa: E402


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding vae.pt, mdnrnn.pt and (for D's rule) danger.pt
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty of the levels
    episodes: int = 1000  # held-out levels per rule
    thresholds: str = "0"  # comma-separated: UP iff the logit < thr (0: C's start point)
    seed: int = 1_000_003  # level stream (evaluate.py's held-out one)

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1))
        try:
            self.thr = [float(t) for t in self.thresholds.split(",")]
        except ValueError:
            fail(f"--thresholds {self.thresholds}: expected comma-separated numbers, e.g. --thresholds=0,-1.5")


class Counting:
    """An Agent that also remembers, per env, how many steps before its last action it last chose UP."""

    def __init__(self, agent):
        self.agent = agent

    def reset(self, num_envs):
        self.agent.reset(num_envs)
        self.since, self.final = np.zeros(num_envs, int), np.zeros(num_envs, int)  # (N,) each

    def act(self, obs, first, alive=None):
        actions = self.agent.act(obs, first, alive)  # (N,) procgen ids
        self.since = np.where(actions == ACTIONS[UP], 0, self.since + 1)
        self.final = np.where(alive, self.since, self.final)  # frozen once an env's episode is over
        return actions


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    d_path = os.path.join(cfg.run, "danger.pt")
    readers = [("zhd", load_danger(d_path))] if os.path.exists(d_path) else []
    readers += [("zhm", None)] if mdn.hop is not None else []
    print(f"{cfg.run}: {cfg.episodes} {cfg.distribution_mode} levels of seed {cfg.seed}")
    print(f"{'rule':<22} {'win':>6} {'died after UP':>13} {'died waiting':>12} {'timeout':>7} {'win length':>10}")
    for inputs, danger in readers:
        sizes = input_sizes(inputs, vae.z_dim, mdn.hidden)
        for thr in cfg.thr:
            x0 = start_point(len(ACTIONS) * (sum(sizes.values()) + 1), inputs, 1.0, thr)  # (5,F+1): UP iff logit < thr
            policy = Counting(Agent(vae, mdn, torch.as_tensor(x0), inputs, danger))
            ret, length = play(policy, cfg.episodes, cfg.seed, cfg.distribution_mode, desc=f"{inputs} {thr}")
            win, timeout = ret > 0, (ret <= 0) & (length >= MAX_STEPS)
            died, win_length = ~win & ~timeout, length[win].mean() if win.any() else float("nan")
            name = f"{'D' if inputs == 'zhd' else 'M hop head'}, thr {thr:g}"
            print(f"{name:<22} {win.mean():>6.1%} {(died & (policy.final <= 5)).mean():>13.1%} "
                  f"{(died & (policy.final > 5)).mean():>12.1%} {timeout.mean():>7.1%} {win_length:>10.1f}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
