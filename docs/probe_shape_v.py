"""Probe: can V's z be made to keep what kills? V fine-tuned on its own loss plus M's hop loss (Dreamer shapes its
latents the same way, by its reward and continue heads), then the world model's rule without D on held-out levels.

M's hop head on V's frozen z stays short of D in the game (README): the z of a V trained for reconstruction
alone blurs what decides a hop. Here V (from --run's vae.pt) and a new danger.HopHead learn together: each step,
V's ELBO on a batch of the run's frames (vae.vae_loss, as V was trained) plus --hop-weight times the hop head's
BCE on a batch of hop-then-wait moves (all 5 moves, half mirrored, as in M's stage), through V's encoder. Printed:
the hop head's AUC on the held-out probe's UPs (evaluate.py's level stream), V's held-out error before and after,
and C's start point "UP iff the hop logit < 0, else wait" (controller.Agent, no search) on held-out levels.

    python docs/probe_shape_v.py --run runs --steps 6000 --hop-steps 800000
"""
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, FG_UNIT, check_flags, cli, load_frames  # noqa: E402
from controller import Agent, input_sizes  # noqa: E402
from danger import MIRROR, HopHead, auc, hop_then_wait, start_point  # noqa: E402
from evaluate import play  # noqa: E402
from mdnrnn import MDNRNN  # noqa: E402
from vae import evaluate, load_vae, pixel_weight, to_input, vae_loss  # noqa: E402


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding data/ and vae.pt (a default run's)
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty (the run's)
    hop_steps: int = 800_000  # env steps of hop-then-wait play to learn from (seed 0)
    steps: int = 6000  # gradient steps, each 64 frames of V's data and 64 moves
    hop_weight: float = 100.0  # weight of the hop BCE beside V's ELBO (summed per frame: ~200)
    lr: float = 2e-4  # Adam's for V (the hop head: 1e-3)
    episodes: int = 1000  # held-out levels for the rule
    seed: int = 1_000_003  # held-out level stream (evaluate.py's) of the AUC and the rule

    def __post_init__(self):
        check_flags(self, at_least=dict(hop_steps=256, steps=1, episodes=1), above=dict(lr=0, hop_weight=0))


def move(obs, last, a, env):
    """A move of hop-then-wait play: its frame, the last and the action as a 7th plane, (n,64,64,7) uint8."""
    plane = np.broadcast_to(a[:, None, None, None], (*obs.shape[:3], 1)).astype(np.uint8)  # (n,64,64,1)
    return np.concatenate([obs, last, plane], -1)  # (n,64,64,7)


def main(cfg):
    torch.manual_seed(0)
    vae = load_vae(os.path.join(cfg.run, "vae.pt"))
    rows, held, _ = load_frames(os.path.join(cfg.run, "data"), 20, 24, tempfile.TemporaryFile())  # V's defaults
    train_idx, test_idx = np.flatnonzero(~held), np.flatnonzero(held)
    print(f"V before: held-out error per frame {evaluate(vae, rows, test_idx)[0]:.1f}", flush=True)
    X, y = hop_then_wait(cfg.distribution_mode, cfg.hop_steps, 256, 0, move, moves=range(len(ACTIONS)))
    X_test, y_test = hop_then_wait(cfg.distribution_mode, 50_000, 64, cfg.seed, move)  # the probe's UPs
    print(f"{len(y)} moves ({y.mean():.1%} deadly), {len(y_test)} held-out UPs", flush=True)
    head, rng = HopHead(vae.z_dim, vae.spatial), np.random.default_rng(0)
    opt = torch.optim.Adam([dict(params=vae.parameters(), lr=cfg.lr), dict(params=head.parameters(), lr=1e-3)])

    def encode(frames):  # uint8 (n,64,64,3), maybe a mirrored view -> V's mu (n,Z)
        return vae.encode(to_input(np.ascontiguousarray(frames)))[0]

    def hop_logits(x, a):  # moves (n,64,64,7), their actions (n,) -> the hop head's logits (n,)
        return head(encode(x[..., :3]), encode(x[..., 3:6]), torch.from_numpy(a.astype(np.int64)))

    t0, bce = time.time(), []
    for step in range(cfg.steps):
        frames, fg_weights = rows(rng.choice(train_idx, 64))  # V's own loss, as vae.py trains it (fg weight 10)
        x = to_input(frames)
        recon, mu, logvar = vae(x)
        elbo = vae_loss(x, recon, mu, logvar, pixel_weight(fg_weights, 10, FG_UNIT), 1.0, 0.5)[0]
        b, m = rng.choice(len(y), 64), rng.random(64) < 0.5  # 64 moves, half of them seen in a mirror
        xb, a = X[b], X[b, 0, 0, 6]  # (64,64,64,7), (64,)
        xb, a = np.where(m[:, None, None, None], xb[:, :, ::-1], xb), np.where(m, MIRROR.numpy()[a], a)  # LEFT<->RIGHT
        hop = F.binary_cross_entropy_with_logits(hop_logits(xb, a), torch.from_numpy(y[b]))
        opt.zero_grad()
        (elbo + cfg.hop_weight * hop).backward()
        opt.step()
        bce.append(hop.item())
        if (step + 1) % 1000 == 0 or step + 1 == cfg.steps:
            vae.eval(), head.eval()
            with torch.no_grad():
                s = torch.cat([hop_logits(X_test[i:i + 512], X_test[i:i + 512, 0, 0, 6])
                               for i in range(0, len(X_test), 512)]).numpy()
            vae.train(), head.train()
            print(f"step {step + 1} hop_bce {np.mean(bce[-1000:]):.3f} held-out UP AUC {auc(s, y_test):.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    vae.eval(), head.eval()
    print(f"V after: held-out error per frame {evaluate(vae, rows, test_idx)[0]:.1f}")
    mdn = MDNRNN(vae.z_dim, 1, 1, hop=head)  # only its hop head is read: the start point's weights on h are 0
    sizes = input_sizes("zhm", vae.z_dim, mdn.hidden)
    weights = torch.as_tensor(start_point(len(ACTIONS) * (sum(sizes.values()) + 1), "zhm", 1.0))  # (5,F+1)
    ret, length = play(Agent(vae, mdn, weights, "zhm"), cfg.episodes, cfg.seed, cfg.distribution_mode)
    print(f"UP iff the hop logit < 0, else wait: {(ret > 0).mean():.1%} of {cfg.episodes} held-out levels won")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
