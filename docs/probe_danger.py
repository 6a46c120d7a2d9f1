"""Probe: is "this hop is deadly" learnable, from the pixels and from V's z, once the data says
which hop killed the frog?

Random play blurs that label: the frog may die a few steps after an UP because of what it did next.
Here the data is collected with "hop, then wait": a move, then 5-12 no-ops, so a death before the
next move belongs to that move. Each UP is labelled "died before the next move", and classifiers
are trained on (this frame, last frame) -> label: a small CNN on the pixels, and an MLP and a
linear layer on V's z of both frames. Held-out AUC (0.5 = chance, 1 = perfect) after each epoch.
Then the CNN plays held-out levels with a hand rule, "UP unless the CNN says this UP is deadly",
beside always-UP: what such a danger feature would be worth to a controller. This probe led to D
(danger.py), whose play and CNN it now uses.

    python docs/probe_danger.py --vae runs/easy-default/vae.pt --steps 400000
"""
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, NONE, UP, cli  # noqa: E402
from danger import DangerNet, auc, hop_then_wait  # noqa: E402
from evaluate import Always, play, summarize  # noqa: E402
from vae import encode, load_vae  # noqa: E402


@dataclass
class DangerConfig:
    vae: str = "runs/easy-default/vae.pt"  # V whose z is probed
    distribution_mode: str = "easy"  # game mode
    steps: int = 400_000  # env steps of "hop, then wait" play (not counted in any training budget)
    num_envs: int = 256  # envs stepped together
    cnn_epochs: int = 8  # passes of the pixel CNN over the training UPs
    z_epochs: int = 30  # passes of the classifiers on z
    test_episodes: int = 200  # held-out levels (the evaluation seed) for the hand rule and always-UP
    seed: int = 0  # seeds the levels, the policy and torch


def fit(name, net, inputs, y, test, epochs, batch_size=128):
    """Adam on BCE; prints the held-out AUC after each epoch. inputs(idx) -> a batch of net inputs."""
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    train = np.flatnonzero(~test)
    for epoch in range(epochs):
        t0 = time.time()
        for b in np.array_split(np.random.permutation(train), max(len(train) // batch_size, 1)):
            loss = F.binary_cross_entropy_with_logits(net(inputs(b))[:, 0], torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = torch.cat([net(inputs(b))[:, 0] for b in np.array_split(np.flatnonzero(test), 8)]).numpy()
        print(f"{name} epoch {epoch + 1}: held-out AUC {auc(score, y[test]):.3f} ({time.time() - t0:.0f}s)", flush=True)


def danger_rule(cnn, threshold):
    """A policy for evaluate.play(): UP unless cnn(this frame, last frame) says P(deadly) > threshold,
    then wait. Not a World Models agent: it measures what a danger feature is worth."""
    memory = SimpleNamespace(last=None)

    def act(obs, first, alive=None):
        last = obs.copy() if memory.last is None else np.where(first[:, None, None, None], obs, memory.last)
        x = torch.from_numpy(np.concatenate([obs, last], -1)).permute(0, 3, 1, 2).float() / 255  # (N,6,64,64)
        with torch.no_grad():
            deadly = torch.sigmoid(cnn(x)[:, 0]).numpy() > threshold  # (N,)
        memory.last = obs.copy()
        return ACTIONS[np.where(deadly, NONE, UP)]
    return SimpleNamespace(reset=lambda num_envs: setattr(memory, "last", None), act=act)


if __name__ == "__main__":
    cfg = cli(DangerConfig)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    X, y = hop_then_wait(cfg.distribution_mode, cfg.steps, cfg.num_envs, cfg.seed)
    print(f"{cfg.steps} steps of hop-then-wait: {len(y)} UPs, {y.mean():.1%} of them deadly")
    test = np.arange(len(y)) % 10 == 9
    cnn = DangerNet().net  # the CNN of danger.py: (B,6,64,64) -> (B,1)
    fit("pixels, CNN", cnn, lambda b: torch.from_numpy(X[b]).permute(0, 3, 1, 2).float() / 255, y, test, cfg.cnn_epochs)
    cnn.eval()
    test_seed, mode = 1_000_003, cfg.distribution_mode
    up = summarize(*play(Always(), cfg.test_episodes, test_seed, mode, desc="always-UP"))
    print(f"always-UP on {cfg.test_episodes} held-out levels: {up['win_rate']:.1%}")
    for threshold in (0.3, 0.5, 0.7):
        r = summarize(*play(danger_rule(cnn, threshold), cfg.test_episodes, test_seed, mode, desc="rule"))
        print(f"UP unless the CNN's P(deadly) > {threshold}: {r['win_rate']:.1%} wins, "
              f"{r['mean_length']:.0f} steps per episode", flush=True)
    vae = load_vae(cfg.vae)
    z = torch.from_numpy(np.concatenate([encode(vae, X[..., :3])[0], encode(vae, X[..., 3:])[0]], 1))  # (N,2Z)
    z = (z - z[~test].mean(0)) / (z[~test].std(0) + 1e-3)
    for name, net in (("V's z, MLP", nn.Sequential(nn.Linear(z.shape[1], 256), nn.ReLU(), nn.Linear(256, 256),
                                                   nn.ReLU(), nn.Linear(256, 1))),
                      ("V's z, linear", nn.Linear(z.shape[1], 1))):
        fit(name, net, lambda b: z[b], y, test, cfg.z_epochs)
