"""Probe: V's grid as symbols. Each cell's next value is one of K codes, so that a dreamt cell is a whole thing.

The grid dream of docs/probe_grid_dream.py samples every latent apart (a Gaussian, or with --bins a categorical over
its change); sampled apart, "no change" is a spread of small changes, and 128 of them a step walk the level away
(docs/experiments.md, sixteenth round). Here a cell's V latents (z_dim/64 channels) are replaced by the nearest of K
codes found by k-means on the training frames' cells (VQ-VAE's codebook, fitted after V rather than with it), and the
conv transition gives, per cell, the logits of the next code, plus a learned bonus for the cell's current code: a
cell that the model is sure of stays exactly as it is, and one that changes jumps to another whole code.
`python docs/probe_grid_dream.py --codes K` trains and dreams with it; run alone, this module fits the codebook on a
run's latents and writes V's decoding of held-out first frames, as they are and quantised to 64, 256 and 1024 codes.

    python docs/probe_code_dream.py --run runs --out codes.png
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # and the probes beside it
from collect import cli  # noqa: E402
from danger import HopHead  # noqa: E402
from probe_dream_dynamics import ConvTransition  # noqa: E402


def cells_of(z):
    """V's z (N,Z) -> its 64 cells' vectors (N,64,c): z is (channel, row, column) ordered."""
    return z.view(len(z), -1, 64).transpose(1, 2)  # (N,c,64) -> (N,64,c)


def z_of(cells):
    """The inverse of cells_of: (N,64,c) -> (N,Z)."""
    return cells.transpose(1, 2).reshape(len(cells), -1)  # (N,c,64) -> (N,Z)


def nearest(z, codebook):
    """Each cell's nearest code (N,64) for V's z (N,Z) and codes (K,c)."""
    return torch.cdist(cells_of(z), codebook.expand(len(z), -1, -1)).argmin(-1)  # (N,64,c) to (N,K,c) -> (N,64)


def quantise(z, codebook):
    """V's z (N,Z) with each cell replaced by its nearest code."""
    return z_of(codebook[nearest(z, codebook)])  # (N,64,c) -> (N,Z)


def kmeans(x, k, iters=25, seed=0, sample=300_000):
    """K codes (k,c) for the vectors x (M,c), on a random subset of them: Lloyd's iterations from k-means++'s start
    (each new code drawn with probability ~ the squared distance to the nearest code so far: a frog's cell, one in
    hundreds, gets a code of its own rather than k codes of background)."""
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:sample]]
    codes = x[torch.randint(len(x), (1,), generator=g)]  # (1,c)
    d = (x - codes).pow(2).sum(1)  # (M,) squared distance to the nearest code
    for _ in range(k - 1):
        new = x[torch.multinomial(d + 1e-12, 1, generator=g)]  # (1,c); 1e-12: all zero once every vector is a code
        codes, d = torch.cat([codes, new]), torch.minimum(d, (x - new).pow(2).sum(1))
    for _ in range(iters):
        idx = torch.cdist(x, codes).argmin(1)  # (M,) each vector's nearest code
        count = torch.bincount(idx, minlength=k).float()
        total = torch.zeros_like(codes).index_add_(0, idx, x)
        codes[count > 0] = total[count > 0] / count[count > 0, None]  # an empty code keeps its place
    return codes


class CodeModel(nn.Module):
    """probe_grid_dream.GridModel's interface (forward -> (dist, win, death), nll, mean, sample) with the next z as a
    categorical over K codes per cell."""

    def __init__(self, codebook, width=64):
        super().__init__()
        k, c = codebook.shape
        self.gaussian = False  # probe_grid_dream.losses feeds the unroll the model's samples, not its mean
        self.register_buffer("codebook", codebook)  # (K,c)
        self.move = ConvTransition(c, width, out=k)
        self.win, self.death = HopHead(64 * c, width=width // 2), HopHead(64 * c, width=width // 2)
        self.stay = nn.Parameter(torch.tensor(5.0))  # the logit bonus of "this cell keeps its code"

    def forward(self, z, z_last, a):
        """z, z_last (N,Z), action indices (N,) -> ((the next codes' logits (N,64,K),), win and death logits (N,))."""
        y = self.move(z, z_last, a).flatten(2).transpose(1, 2)  # (N,K,8,8) -> (N,K,64) -> (N,64,K)
        logits = y + self.stay * F.one_hot(nearest(z, self.codebook), len(self.codebook))
        return (logits,), self.win(z, z_last, a), self.death(z, z_last, a)

    def nll(self, dist, target):
        """-log p(the target's codes), (N,64)."""
        logits, k = dist[0].transpose(1, 2), nearest(target, self.codebook)  # (N,K,64), (N,64)
        return F.cross_entropy(logits, k, reduction="none")

    def mean(self, dist):
        """The expected next z (N,Z)."""
        return z_of(torch.softmax(dist[0], -1) @ self.codebook)  # (N,64,K) @ (K,c) -> (N,64,c)

    def sample(self, dist, tau):
        """A next z (N,Z) at temperature tau: one code per cell."""
        return z_of(self.codebook[torch.distributions.Categorical(logits=dist[0] / tau).sample()])  # (N,64,c)


def fit_codebook(z, k, seed=0):
    """K codes (k,c) for the cells of V's z (N,Z)."""
    return kmeans(cells_of(z).reshape(-1, z.shape[1] // 64), k, seed=seed)  # (N,64,c) -> (N*64,c)


def code_model(D, cfg):
    """A CodeModel with cfg.codes codes fitted on the training steps' z (D["z"], (N,Z))."""
    codebook = fit_codebook(D["z"], cfg.codes, cfg.seed)
    z = D["z"][:4096]  # (4096,Z)
    print(f"codebook: {cfg.codes} codes of {codebook.shape[1]} latents; quantising costs a training frame's z "
          f"{(quantise(z, codebook) - z).pow(2).sum(-1).mean():.2f} of squared error")
    return CodeModel(codebook, cfg.width)


@dataclass
class CodesConfig:
    run: str = "runs"  # a run dir with vae.pt and latents/ (train.py's, spatial V)
    out: str = "codes.png"  # the picture: first frames decoded as they are, then quantised to 64, 256, 1024 codes
    frames: int = 8  # held-out first frames in the picture
    seed: int = 0  # seeds k-means


def main(cfg):
    import imageio.v2 as imageio
    from evaluate import decode
    from dream_bench import first_z
    from probe_grid_dream import ProbeConfig, steps_of
    from vae import load_vae
    vae, (D, T) = load_vae(os.path.join(cfg.run, "vae.pt")), steps_of(os.path.join(cfg.run, "latents"))
    z0, rows = first_z(vae, cfg.frames, ProbeConfig(run=cfg.run), 1_000_003), []  # (F,Z)
    for k in (0, 64, 256, 1024):
        codebook = fit_codebook(D["z"], k, cfg.seed) if k else None
        q = (lambda z: quantise(z, codebook)) if k else (lambda z: z)
        err = (q(T["z"]) - T["z"]).pow(2).sum(-1).mean().item()
        print(f"{k or 'no'} codes: held-out frames' squared error of z {err:.4g}")
        rows.append(np.concatenate(list(decode(vae, q(z0))), 1))  # (64,F*64,3)
    imageio.imwrite(cfg.out, np.concatenate(rows, 0))
    print(f"wrote {cfg.out}: rows V's decoding of z, then of z quantised to 64, 256, 1024 codes")


if __name__ == "__main__":
    main(cli(CodesConfig))
