"""Probe: how does C's start point lose? "UP iff the danger logit < thr, else wait", read from D (pixels) or
from M's hop head (V's z), on the same held-out levels: wins, deaths within a hop (5 steps) of an UP (the UP
was called safe and was not), deaths while waiting longer (the frog stood in a lane or on a log too long),
and timeouts at the game's 500-step cap. No search: this is the rule CMA-ES starts from (danger.start_point),
played by controller.Agent itself, and most of the trained agent's skill (README). Two variants of M's rule try to
take back the deaths: --escape M (a rejected UP takes the move the hop head calls safest, waiting favoured by M
logits: a sidestep when waiting kills) and --mirror (the head's logits averaged over the frame and its mirror image).

    python docs/probe_rules.py --run runs --episodes 1000 --thresholds=0,-1.5
    python docs/probe_rules.py --run RUN --distribution-mode hard --seed 7 --episodes 500 --thresholds=-1 --escape=1,2
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, MAX_STEPS, NONE, UP, check_flags, cli, fail  # noqa: E402
from controller import Agent, input_sizes  # noqa: E402
from danger import MIRROR, load_danger, start_point  # noqa: E402
from evaluate import play  # noqa: E402
from mdnrnn import load_mdnrnn  # noqa: E402
from vae import load_vae  # noqa: E402


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding vae.pt, mdnrnn.pt and (for D's rule) danger.pt
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty of the levels
    episodes: int = 1000  # held-out levels per rule
    thresholds: str = "0"  # comma-separated: UP iff the logit < thr (0: C's start point)
    escape: str = ""  # comma-separated margins: M's rule, a rejected UP taking the safest other move (wait + margin)
    mirror: bool = False  # M's rules read the hop head's logits averaged over the frame and its mirror image
    seed: int = 1_000_003  # level stream (evaluate.py's held-out one)

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1))

        def numbers(flag, text):  # "0,-1.5" -> [0.0, -1.5], or one error line naming the flag
            try:
                return [float(t) for t in text.split(",") if t.strip()]
            except ValueError:
                fail(f"--{flag} {text}: expected comma-separated numbers, e.g. --{flag}=0,-1.5")
        self.thr, self.esc = numbers("thresholds", self.thresholds), numbers("escape", self.escape)
        if not self.thr:
            fail("--thresholds: expected at least one number, e.g. --thresholds=0")


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


class Safest(Agent):
    """M's rule "UP iff the hop head's logit of UP < thr"; else, with a margin, the move (not UP) whose logit is the
    lowest, waiting's lowered by the margin (None: wait); with mirror, each logit averaged with the mirror image's."""

    def __init__(self, vae, mdn, thr, margin=None, mirror=False):  # mirror: Agent's, V's z of the mirrored frames
        super().__init__(vae, mdn, torch.zeros(len(ACTIONS), 2), "zhm", mirror=mirror)
        self.thr, self.margin = thr, margin

    def decide(self, z, z_last, h, obs, last, idx):
        moves = torch.arange(len(ACTIONS))
        logit = torch.stack([self.mdn.hop(z, z_last, a.expand(len(z))) for a in moves], 1)  # (n,5)
        if self.mirror:  # the mirror's move m is this frame's MIRROR[m]: LEFT <-> RIGHT
            logit = (logit + torch.stack([self.mdn.hop(*self.zm, a.expand(len(z))) for a in MIRROR], 1)) / 2
        if self.margin is None:  # a rejected UP waits
            rest = torch.full((len(z),), NONE)
        else:  # the safest other move, waiting's logit lowered by the margin; UP is never one of them
            rest = (logit - (moves == NONE) * self.margin + (moves == UP) * 1e9).argmin(1)  # (n,)
        return torch.where(logit[:, UP] < self.thr, UP, rest)


def report(name, agent, cfg):
    """Play agent on cfg's levels and print one row: how it wins and how it loses."""
    policy = Counting(agent)
    ret, length = play(policy, cfg.episodes, cfg.seed, cfg.distribution_mode, desc=name)
    win, timeout = ret > 0, (ret <= 0) & (length >= MAX_STEPS)
    died, win_length = ~win & ~timeout, length[win].mean() if win.any() else float("nan")
    print(f"{name:<38} {win.mean():>6.1%} {(died & (policy.final <= 5)).mean():>13.1%} "
          f"{(died & (policy.final > 5)).mean():>12.1%} {timeout.mean():>7.1%} {win_length:>10.1f}")


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    d_path = os.path.join(cfg.run, "danger.pt")
    readers = [("zhd", load_danger(d_path))] if os.path.exists(d_path) else []
    readers += [("zhm", None)] if mdn.hop is not None else []
    print(f"{cfg.run}: {cfg.episodes} {cfg.distribution_mode} levels of seed {cfg.seed}")
    print(f"{'rule':<38} {'win':>6} {'died after UP':>13} {'died waiting':>12} {'timeout':>7} {'win length':>10}")
    for inputs, danger in readers:
        sizes = input_sizes(inputs, vae.z_dim, mdn.hidden)
        for thr in cfg.thr:
            x0 = start_point(len(ACTIONS) * (sum(sizes.values()) + 1), inputs, 1.0, thr)  # (5,F+1): UP iff logit < thr
            name = f"{'D' if inputs == 'zhd' else 'M hop head'}, thr {thr:g}"
            report(name, Agent(vae, mdn, torch.as_tensor(x0), inputs, danger), cfg)
            if inputs == "zhm":  # M's variants: mirrored, escaping
                mirrored = " mirrored" if cfg.mirror else ""
                for margin in ([None] if cfg.mirror else []) + cfg.esc:
                    report(name + mirrored + (f", escape {margin:g}" if margin is not None else ""),
                           Safest(vae, mdn, thr, margin, cfg.mirror), cfg)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
