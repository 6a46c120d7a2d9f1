"""V: the convolutional variational autoencoder of World Models (Ha & Schmidhuber 2018, section 2.1 and appendix
A.1) that squeezes each 64x64 leaper frame into a small latent z. The model, its loss, encoder and checkpoints need
only torch: copy this file alone for them. Training reads the episodes through collect.py (their format is its),
as the command line does. Its defaults are the pipeline's: a spatial z of 128, 4 epochs.

    python vae.py --data runs/data --out runs/vae.pt
    python vae.py --data runs/data --out runs/vae_flat.pt --z-dim 32 --spatial false   # Ha's flat z
"""
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Literal

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

ReLU = partial(nn.ReLU, inplace=True)  # in place: the same numbers, ~15% faster here (no new tensor per layer)


@dataclasses.dataclass
class VAEConfig:
    data: str = "runs/data"  # directory of episode .npz files with an `obs` array (T,64,64,3) uint8
    out: str = "runs/vae.pt"  # checkpoint; a PNG of reconstructions and a .jsonl log go beside it
    z_dim: int = 128  # size of the latent z (Ha: 32 for CarRacing, 64 for Doom; spatial: a multiple of 64)
    spatial: bool = True  # z as an 8x8 grid of z_dim/64 channels (false: Ha's flat vector)
    epochs: int = 4  # passes over the training frames
    batch_size: int = 128  # frames per gradient step
    lr: float = 1e-3  # Adam learning rate
    beta: float = 1.0  # weight of the KL term once warmed up (1 = a true VAE)
    beta_warmup: int = 1000  # gradient steps over which beta grows linearly from 0 (seed: by hand; none with --init)
    kl_tolerance: float = 0.5  # free bits: a total KL below this many nats times z_dim is not penalised
    fg_weight: float = 10.0  # extra weight of pixels that differ from their episode's background
    fg_threshold: int = 24  # a pixel is foreground if some channel differs from the median by more
    colour_balance: bool = False  # spread the foreground weight so each colour of a frame weighs the same (hard's frog)
    holdout: int = 20  # every holdout-th episode is kept out of training, for the test error
    seed: int = 0  # seeds torch and the shuffling
    resume: bool = False  # continue from --out instead of refusing to overwrite it
    init: str = ""  # start from this V's weights, not at random (train.py --iterations: the last round's V)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where to train (auto: the GPU if torch sees one)

    def __post_init__(self):  # every flag is checked before anything is written: one error line
        pick_device(self.device)
        if min(self.z_dim, self.epochs, self.batch_size, self.fg_threshold) < 1 or not self.lr > 0 or self.holdout == 1:
            sys.exit("error: --z-dim, --epochs, --batch-size, --fg-threshold must be >= 1, --lr > 0, --holdout not 1")
        if self.spatial and self.z_dim % 64:
            sys.exit(f"error: --z-dim {self.z_dim}: a spatial V needs a multiple of 64 (8x8 cells), or --spatial false")


class ConvVAE(nn.Module):
    """Ha's ConvVAE: 4 stride-2 convs to (256,2,2), z ~ N(mu, sigma), fc + 4 transposed convs. spatial=True
    keeps 4 conv layers each way but gives z a layout: z_dim/64 channels on an 8x8 grid, one cell per
    8x8-pixel patch, so the small objects (frog ~5x5 px, cars ~6x3 px) are learned in minutes, not hours."""

    def __init__(self, z_dim=32, spatial=False):
        super().__init__()
        self.z_dim, self.spatial = z_dim, spatial
        if spatial:
            if z_dim % 64:
                raise ValueError(f"z_dim {z_dim}: a spatial latent needs a multiple of 64 (channels x 8 x 8)")
            c = z_dim // 64
            self.encoder = nn.Sequential(  # (B,3,64,64) -> (B,2c,8,8): mu and logvar per cell
                nn.Conv2d(3, 32, 4, 2, 1), ReLU(), nn.Conv2d(32, 64, 4, 2, 1), ReLU(),
                nn.Conv2d(64, 128, 4, 2, 1), ReLU(), nn.Conv2d(128, 2 * c, 3, 1, 1))
            self.decoder = nn.Sequential(  # (B,c,8,8) -> (B,3,64,64)
                nn.Conv2d(c, 128, 3, 1, 1), ReLU(), nn.ConvTranspose2d(128, 64, 4, 2, 1), ReLU(),
                nn.ConvTranspose2d(64, 32, 4, 2, 1), ReLU(), nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Sigmoid())
            return
        self.encoder = nn.Sequential(  # (B,3,64,64) -> (B,256,2,2) -> (B,1024)
            nn.Conv2d(3, 32, 4, 2), ReLU(), nn.Conv2d(32, 64, 4, 2), ReLU(),
            nn.Conv2d(64, 128, 4, 2), ReLU(), nn.Conv2d(128, 256, 4, 2), ReLU(), nn.Flatten())
        self.mu, self.logvar, self.fc = nn.Linear(1024, z_dim), nn.Linear(1024, z_dim), nn.Linear(z_dim, 1024)
        self.decoder = nn.Sequential(  # (B,1024,1,1) -> (B,3,64,64)
            nn.ConvTranspose2d(1024, 128, 5, 2), ReLU(), nn.ConvTranspose2d(128, 64, 5, 2), ReLU(),
            nn.ConvTranspose2d(64, 32, 6, 2), ReLU(), nn.ConvTranspose2d(32, 3, 6, 2), nn.Sigmoid())

    def encode(self, x):
        """x (B,3,64,64) in [0,1] -> mu, logvar, each (B,z_dim)."""
        h = self.encoder(x)  # flat: (B,1024); spatial: (B,2c,8,8)
        if self.spatial:
            mu, logvar = h.chunk(2, dim=1)  # (B,c,8,8) each
            return mu.flatten(1), logvar.flatten(1).clamp(-10, 10)  # (B,z_dim)
        return self.mu(h), self.logvar(h).clamp(-10, 10)

    def decode(self, z):
        if self.spatial:
            return self.decoder(z.view(len(z), -1, 8, 8))  # (B,z_dim) -> (B,c,8,8) -> (B,3,64,64)
        return self.decoder(self.fc(z)[:, :, None, None])  # (B,1024,1,1) -> (B,3,64,64)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation trick
        return self.decode(z), mu, logvar


def to_input(frames):
    """uint8 (B,64,64,3) array or tensor -> float (B,3,64,64) in [0,1]."""
    return torch.as_tensor(frames).permute(0, 3, 1, 2).float().div_(255)


def vae_loss(x, recon, mu, logvar, weight, beta, kl_tolerance):
    """Returns (loss, recon, kl), each averaged over the batch. Both terms are SUMMED within a frame (over
    64*64*3 pixels, over the z_dim latents) and AVERAGED over the batch, so beta=1 is the real ELBO (the
    seed's per-pixel MEAN error with a batch-SUMMED KL made the KL ~10^5 times too strong). `weight`
    (B,1,64,64) multiplies each pixel's error: moving things are ~5% of the pixels, easily dropped."""
    rec = (weight * (recon - x).pow(2)).sum(dim=(1, 2, 3)).mean()
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).sum(dim=1).mean()  # KL(N(mu, sigma^2) || N(0, I)), closed form
    # Free bits as in Ha's code: the KL summed over the latent dims (here also averaged over the batch)
    # is not penalised below kl_tolerance * z_dim nats: a floor on the total, not on each dim.
    return rec + beta * kl.clamp(min=kl_tolerance * mu.shape[1]), rec, kl


def pixel_weight(fg_weights, fg_weight, unit):
    """load_frames' foreground weights uint8 (B,64,64) (unit: a plain foreground pixel) -> vae_loss's (B,1,64,64)."""
    return 1 + fg_weight * torch.as_tensor(fg_weights).unsqueeze(1).float() / unit


@torch.no_grad()
def encode(model, frames, batch_size=1024):
    """uint8 frames (N,64,64,3) -> mu, logvar as float32 numpy (N,z_dim), batched, no grad."""
    dev = next(model.parameters()).device
    out = [model.encode(to_input(frames[i:i + batch_size]).to(dev)) for i in range(0, len(frames), batch_size)]
    return tuple(torch.cat(t).cpu().numpy() for t in zip(*out))


@torch.no_grad()
def reconstruction_grid(model, frames):
    """uint8 image: the frames in the top row, V's reconstructions (from mu) below."""
    x = to_input(frames).to(next(model.parameters()).device)
    recon = model.decode(model.encode(x)[0]).cpu()  # (B,3,64,64)
    recon = (recon.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B,64,64,3)
    return np.concatenate([np.concatenate(list(frames), 1), np.concatenate(list(recon), 1)], 0)


def load_checkpoint(path):
    """One checkpoint dict, loaded onto the CPU with weights_only=True (tensors and plain containers:
    a file from elsewhere cannot run code). Anything else gives one error line naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. pickle.UnpicklingError for a file that would need arbitrary code
        why = "no such file" if isinstance(e, FileNotFoundError) else type(e).__name__  # not torch's advice to unpickle
        sys.exit(f"error: {path}: not a checkpoint of this project ({why})")
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        sys.exit(f"error: {path}: not a checkpoint of this project (expected a dict with a config)")
    return ckpt


def load_vae(path):
    """Rebuild V from its checkpoint alone (the config is inside)."""
    ckpt = load_checkpoint(path)
    model = ConvVAE(ckpt["config"]["z_dim"], ckpt["config"].get("spatial", False))
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    model.id = ckpt.get("id", "")  # what made it: later stages record it (made_from)
    return model.eval().to(memory_format=torch.channels_last)  # ~30% faster encoding on CPU; equal up to float rounding


PATH_FLAGS = ("data", "out", "latents", "vae", "mdnrnn", "danger", "resume", "init", "workers", "pool", "device")  # not what


def identity(config, **made_from):
    """A short hash of what made a checkpoint (flags but paths, inputs, position): stages record their inputs'."""
    flags = {k: v for k, v in config.items() if k not in PATH_FLAGS}
    return hashlib.sha256(json.dumps([flags, made_from], sort_keys=True).encode()).hexdigest()[:16]


def resume_point(cfg, length="epochs", made_from=None):
    """The checkpoint at cfg.out to continue (or skip) from, or None. One error line for an existing --out
    without --resume, or one made with other flags (but paths and `length`) or inputs (made_from: {name: id})."""
    if not os.path.exists(cfg.out):
        return None
    if not cfg.resume:
        sys.exit(f"error: --out {cfg.out} exists; pass --resume to continue it, or choose another path")
    ckpt = load_checkpoint(cfg.out)
    flags = [f"--{k.replace('_', '-')} {v} (it has {ckpt['config'][k]})" for k, v in dataclasses.asdict(cfg).items()
             if k not in PATH_FLAGS + (length,) and ckpt["config"].get(k, v) != v]
    made_before = ckpt.get("made_from", made_from)
    inputs = [f"{k} (changed since)" for k, v in (made_from or {}).items() if made_before.get(k) != v]
    if flags or inputs:
        sys.exit(f"error: {cfg.out} was made with other flags or inputs: {', '.join(flags + inputs)}; "
                 "use another --out")
    return ckpt


def save_atomic(obj, path):
    torch.save(obj, buffer := io.BytesIO())  # in memory first: a full disk is then a plain OSError (ENOSPC)
    Path(path + ".tmp").write_bytes(buffer.getvalue())
    os.replace(path + ".tmp", path)  # a crash or a full disk mid-write never leaves a half checkpoint


@torch.no_grad()
def evaluate(model, rows, idx, batch_size=512):
    """Mean summed squared error per frame over all pixels and over foreground pixels only, on frames idx."""
    err = fg = 0.0
    for i in range(0, len(idx), batch_size):
        frames, fg_weights = rows(idx[i:i + batch_size])
        x = to_input(frames).to(next(model.parameters()).device)
        se = (model.decode(model.encode(x)[0]) - x).pow(2).sum(1).cpu()  # (B,64,64)
        err += se.sum().item()
        fg += (se * torch.as_tensor(fg_weights > 0)).sum().item()
    return err / max(len(idx), 1), fg / max(len(idx), 1)


def pick_device(name):
    """--device: auto -> "cuda" if torch sees a GPU, else "cpu"; cuda without one -> one error line."""
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: torch sees no CUDA device here (use --device auto or cpu)")
    return name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def start_training(model, lr, ckpt=None, device="auto"):
    """Adam on --device; from ckpt (resume_point's): weights, optimizer, position. -> (model, opt, epoch, step, dev)."""
    dev = pick_device(device)
    model = model.to(dev, memory_format=torch.channels_last)  # NHWC conv weights: ~20% faster on CPU; LSTMs unaffected
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    return model, opt, ckpt["epoch"] if ckpt else 0, ckpt.get("step", 0) if ckpt else 0, dev  # D counts no steps


def data_identity(data_dir):
    """What V is made from: the number of episode files in data_dir and the flags that collected them."""
    names, made_with = os.listdir(data_dir) if os.path.isdir(data_dir) else [], Path(data_dir, "collect_config.json")
    flags = json.loads(made_with.read_text()) if made_with.exists() else {}  # written by collect.py
    return dict(episodes=sum(n.endswith(".npz") for n in names), data=identity(flags))


def train(cfg):
    init = load_checkpoint(cfg.init) if cfg.init else None  # a V to fine-tune (its id joins what V is made from)
    made_from = {**data_identity(cfg.data), **(dict(init=init.get("id", "")) if init else {})}
    if init and (init["config"]["z_dim"], init["config"].get("spatial", False)) != (cfg.z_dim, cfg.spatial):
        sys.exit(f"error: --init {cfg.init}: a V with z {init['config']['z_dim']}, spatial "
                 f"{init['config'].get('spatial', False)}; expected --z-dim {cfg.z_dim} --spatial {cfg.spatial}")
    ckpt = resume_point(cfg, made_from=made_from)
    if ckpt and ckpt["epoch"] >= cfg.epochs:
        print(f"V: {cfg.out} already has {cfg.epochs} epochs, skipping")
        return load_vae(cfg.out)
    torch.manual_seed(cfg.seed)  # seeding, in one place: weights, sampling and (below) shuffling
    os.makedirs(out_dir := os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    from collect import FG_UNIT, load_frames  # the episode format is collect.py's
    store = tempfile.TemporaryFile(dir=out_dir)  # the frames, on disk (see load_frames); deleted when closed
    rows, held, fg = load_frames(cfg.data, cfg.holdout, cfg.fg_threshold, store, cfg.colour_balance)
    train_idx, test_idx = np.flatnonzero(~held), np.flatnonzero(held)
    model, opt, epoch, step, dev = start_training(ConvVAE(cfg.z_dim, cfg.spatial), cfg.lr, ckpt, cfg.device)
    if init and not ckpt:
        model.load_state_dict(init["model"])  # fine-tuned on all the data so far (Ha's iterative training)
    base = os.path.splitext(cfg.out)[0]
    pool = test_idx if len(test_idx) >= 8 else train_idx
    show = rows(pool[np.linspace(0, len(pool) - 1, 8).astype(int)])[0]  # 8 fixed frames for the PNG
    print(f"V: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train_idx)} training frames, "
          f"{len(test_idx)} held-out, foreground {fg:.1%} of pixels")
    while epoch < cfg.epochs:
        model.train()
        t0, tot = time.time(), np.zeros(3)
        # Each epoch's order comes from (seed, epoch): a resumed run shuffles exactly as an unbroken one.
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(train_idx)
        for i in tqdm(range(0, len(perm), cfg.batch_size), desc=f"V epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=None):  # disable=None: a bar on a terminal, none in a log file
            frames, fg_weights = rows(perm[i:i + cfg.batch_size])
            x, weight = to_input(frames).to(dev), pixel_weight(fg_weights, cfg.fg_weight, FG_UNIT).to(dev)  # (B,3|1,..)
            beta = cfg.beta * (1.0 if init else min(1.0, step / max(cfg.beta_warmup, 1)))  # a fine-tune: no warm-up
            recon, mu, logvar = model(x)
            loss, rec, kl = vae_loss(x, recon, mu, logvar, weight, beta, cfg.kl_tolerance)
            if not torch.isfinite(loss):
                sys.exit(f"error: V's loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; the last good "
                         f"checkpoint is {cfg.out} (epoch {epoch}): lower --lr and run again with --resume")
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            tot += np.array([loss.item(), rec.item(), kl.item()]) * len(x)
        epoch += 1
        model.eval()
        test_err, test_fg = evaluate(model, rows, test_idx)
        row = dict(epoch=epoch, step=step, loss=tot[0] / len(perm), recon=tot[1] / len(perm), kl=tot[2] / len(perm),
                   beta=beta, test_sq_err=test_err, test_fg_sq_err=test_fg, frames_per_s=len(perm) / (time.time() - t0))
        print("V " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        config = dataclasses.asdict(cfg)
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=config, epoch=epoch, step=step,
                         made_from=made_from, id=identity(config, epoch=epoch, **made_from)), cfg.out)
        with open(base + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        imageio.imwrite(base + ".png", reconstruction_grid(model, show))
    store.close()
    return model.cpu()


if __name__ == "__main__":
    from collect import cli, interruptible  # the command line only: the model, loss and training need nothing of ours
    torch.set_num_threads(os.cpu_count() or 1)
    interruptible(train, cli(VAEConfig))
