"""Probe: does M's dream know what an action does? Fixed policies in the dream beside the real game.

A dream a controller can learn in must rank policies as the game does: always-UP wins about a third of
easy levels, always-NONE and always-LEFT never win. This plays each fixed policy in M's dream
(mdnrnn.dream, temperature --tau, from V's z of the first frames of --episodes held-out levels) and
in the real game on the same levels (evaluate.play), and prints win rate and mean length of both.

    python docs/probe_dream_actions.py --run runs --episodes 256
"""
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTION_NAMES, MAX_STEPS, NONE, UP, cli, make_env  # noqa: E402
from evaluate import Always, play  # noqa: E402
from mdnrnn import dream, load_mdnrnn  # noqa: E402
from vae import load_vae, to_input  # noqa: E402


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding vae.pt and mdnrnn.pt
    distribution_mode: str = "easy"  # procgen difficulty of the levels
    episodes: int = 256  # levels per policy, dream and real alike
    tau: float = 1.15  # temperature of the dream
    seed: int = 1_000_003  # level stream (evaluate.py's held-out one); also seeds the dream's sampling


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    z0 = vae.encode(to_input(make_env(cfg.episodes, cfg.distribution_mode, seed=cfg.seed).observe()[1]["rgb"]))[0]
    print(f"{cfg.run}: {cfg.episodes} {cfg.distribution_mode} levels, dream at tau {cfg.tau}")
    print(f"{'policy':<8} {'dream win':>9} {'dream len':>9} {'real win':>8} {'real len':>8}")
    with torch.no_grad():
        for a in (UP, NONE, ACTION_NAMES.index("LEFT")):
            torch.manual_seed(cfg.seed)
            ret, length = dream(mdn, lambda z, h, idx: torch.full((len(z),), a), z0, cfg.tau, MAX_STEPS)
            real_ret, real_len = play(Always(a), cfg.episodes, cfg.seed, cfg.distribution_mode, desc=ACTION_NAMES[a])[:2]
            print(f"{ACTION_NAMES[a]:<8} {(ret > 0).float().mean().item():>9.1%} {length.float().mean().item():>9.1f} "
                  f"{(real_ret > 0).mean():>8.1%} {real_len.mean():>8.1f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(cli(ProbeConfig))
