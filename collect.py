"""Random rollouts of procgen leaper: the data V and M learn from (World Models, section 3: "collect 10,000
rollouts from a random policy"). One process steps N environments in one C++ call (procgen's ProcgenGym3Env): tens
of thousands of steps per second on a laptop CPU. Each finished episode is one compressed .npz: obs uint8
(T,64,64,3), action int8 (T,) (an index 0..4 into ACTIONS), reward float32 (T,), done bool (T,) with done[-1] True.
obs[t] is the frame the agent saw when it chose action[t]; reward[t] is what that action earned.

This file is also the one definition of leaper's actions, of the env and of the episode format (V reads its frames
through load_frames), and it holds what every command line shares (the dataclass CLI, flag checks, one-line
errors, Ctrl-C); every other module imports them from here.

    python collect.py --out runs/data --episodes 2000 --distribution-mode easy --seed 0
"""
import argparse
import contextlib
import dataclasses
import errno
import inspect
import io
import json
import os
import re
import sys
import time
import typing
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tqdm import tqdm

# Leaper reads 15 procgen actions, of which 5 mean something (diagonals move horizontally).
ACTION_NAMES = ("LEFT", "DOWN", "NONE", "UP", "RIGHT")
ACTIONS = np.array([1, 3, 4, 5, 7], dtype=np.int32)  # index 0..4 -> procgen action id
UP, NONE = ACTION_NAMES.index("UP"), ACTION_NAMES.index("NONE")  # the indices C and M use
MAX_STEPS = 500  # procgen ends every leaper episode after 500 steps
ROW = 64 * 64 * 4  # bytes per frame in load_frames' store: 64*64*3 of the frame, 64*64 of its weights
FG_UNIT = 4  # load_frames' weights count quarters: a plain foreground pixel has FG_UNIT (uint8, and finer)


def make_env(num, distribution_mode="easy", seed=0, start_level=0, num_levels=0):
    """num leaper envs stepped together. With num_levels=0 the levels come from the seed's stream;
    num_levels=1 makes all num envs play level start_level (identical for identical actions)."""
    with contextlib.redirect_stderr(io.StringIO()):  # gym's import prints a deprecation notice
        from procgen import ProcgenGym3Env  # imported here so that importing this module stays cheap
    return ProcgenGym3Env(num=num, env_name="leaper", distribution_mode=distribution_mode,
                          num_levels=num_levels, start_level=start_level, rand_seed=seed)


@dataclass
class CollectConfig:
    out: str = "runs/data"  # directory of episode_NNNNNN.npz files
    episodes: int = 2000  # total number of episodes in the directory when done
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty
    seed: int = 0  # same seed, same episodes
    num_envs: int = 64  # envs stepped together (one C++ call); keep it fixed when resuming
    up_prob: float = 0.4  # probability that a new random action is UP (uniform: 0.2)
    max_repeat: int = 6  # each random action is held for 1..max_repeat steps
    compress: bool = True  # zlib-compress the .npz files (~10x smaller, but zlib caps the speed)

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1, num_envs=1, max_repeat=1, up_prob=0))
        if self.up_prob > 1:
            fail(f"--up-prob {self.up_prob}: expected a probability, at most 1")


def field_comments(cls):
    """{field: its one-line comment} from the dataclass's source: the text that --help shows."""
    fields = (re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2) for m in fields if m}


def strict_bool(text):
    """'true'/'false' (also yes/no, 1/0, on/off); anything else, e.g. 'ture', is an error, not False."""
    value = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
    if text.lower() in value:
        return value[text.lower()]
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def cli(cls, argv=None, defaults=None):
    """An argparse CLI from a dataclass: each field becomes --kebab-case, its comment the help, a
    Literal[...] type the choices, a bool a flag that works bare (--resume) or with a value
    (--resume false). Defaults come from `defaults` (an instance, e.g. a preset) or the dataclass."""
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n\n")[0])
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults else f.default
        text = comments.get(f.name, "").replace("%", "%%") + (f" (default: {default})" if default != "" else "")
        kw = dict(default=default, help=text)
        if f.type is bool:
            kw.update(type=strict_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(f.type) is typing.Literal:
            kw.update(choices=typing.get_args(f.type))
        else:
            kw.update(type=f.type)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return cls(**vars(p.parse_args(argv)))


def interruptible(stage, cfg):
    """stage(cfg) for the command line: Ctrl-C or a full disk ends it with one line on how to go on, not a
    traceback. Every file is written atomically, so what finished before is intact."""
    again = "the same command" + (" with --resume" if getattr(cfg, "resume", True) is False else "")
    try:
        return stage(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted: what finished is saved; run {again} to continue", file=sys.stderr)
        sys.exit(130)  # the shell's code for "ended by Ctrl-C"
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: the disk is full (writing {e.filename or 'a file'}); what finished before is intact: "
                 f"free some space and run {again} to continue")


def fail(msg):
    """One clear line on stderr and exit code 1: the way every module reports bad input."""
    sys.exit(f"error: {msg}")


def check_flags(cfg, at_least=None, above=None):
    """Every flag is checked before anything is written: the first field of cfg below its minimum
    (at_least: {name: lowest allowed}; above: {name: a bound it must exceed}) gets one error line."""
    for name, low in (at_least or {}).items():
        if getattr(cfg, name) < low:
            fail(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected at least {low}")
    for name, low in (above or {}).items():
        if not getattr(cfg, name) > low:
            fail(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a number above {low}")


def check_same_flags(new, old, source, free=()):
    """One error line for the first flag of new (a config dict) that differs from old, the flags that
    made `source`: a data dir, run dir or checkpoint is continued only with the flags that made it."""
    for name, value in new.items():
        if name not in free and old.get(name, value) != value:
            fail(f"--{name.replace('_', '-')} {value} conflicts with {source}, made with {old[name]}: "
                 "use another --out")


def episode_path(out, index):
    return os.path.join(out, f"episode_{index:06d}.npz")


def savez(path, compress, **arrays):
    """np.savez with zlib level 1: 2-3x faster than np.savez_compressed (level 6) here, files ~1.5x larger (measured:
    20k against 7k frames/s). To a temp file, then renamed: a half-written file never has a final name (resume)."""
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path + ".tmp", "w", mode, compresslevel=1) as z:
        for name, a in arrays.items():
            with z.open(name + ".npy", "w", force_zip64=True) as g:
                np.lib.format.write_array(g, np.asarray(a))
    os.replace(path + ".tmp", path)


def load_episode(path):
    """Read one episode; a corrupt or truncated file gives one error line naming it."""
    try:
        with np.load(path) as d:
            ep = {k: d[k] for k in ("obs", "action", "reward", "done")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fail(f"{path}: not a readable episode (.npz with obs, action, reward, done): {e}")
    T = len(ep["action"])
    if ep["obs"].shape != (T, 64, 64, 3) or len(ep["reward"]) != T or len(ep["done"]) != T or T == 0:
        fail(f"{path}: inconsistent episode arrays {[(k, v.shape) for k, v in ep.items()]}")
    return ep


def list_episodes(data_dir):
    """Sorted episode files of a data dir, or one clear error if there are none."""
    if not os.path.isdir(data_dir):
        fail(f"--data {data_dir}: no such directory (make one with collect.py)")
    files = sorted(f for f in os.listdir(data_dir) if f.startswith("episode_") and f.endswith(".npz"))
    if not files:
        fail(f"--data {data_dir}: no episode_*.npz files in it (make them with collect.py)")
    return [os.path.join(data_dir, f) for f in files]


def load_frames(data_dir, holdout, fg_threshold, store, colour_balance=False):
    """V's frames and their foreground weights (FG_UNIT where a pixel differs from its episode's median frame: frog,
    cars, logs; or as colour_weights spreads it) go to the open file `store`: RAM holds a batch (paper preset: ~5 GB).
    -> rows(idx) -> (frames uint8 (n,64,64,3), weights uint8 (n,64,64)) of frames idx; held-out flags; the fg share."""
    held, fg = [], 0
    for k, path in enumerate(tqdm(list_episodes(data_dir), desc="load frames", unit="ep", disable=None)):
        obs = load_episode(path)["obs"]  # (T,64,64,3)
        background = np.median(obs, axis=0).astype(np.int16)  # (64,64,3)
        mask = np.abs(obs - background).max(axis=3) > fg_threshold  # (T,64,64)
        weight = colour_weights(obs, mask) if colour_balance else mask.astype(np.uint8) * FG_UNIT  # (T,64,64)
        store.write(np.concatenate([obs.reshape(len(obs), -1), weight.reshape(len(obs), -1)], 1).tobytes())  # (T,ROW)
        held.append(np.full(len(obs), holdout > 0 and k % holdout == holdout - 1))
        fg += int(mask.sum())
    held = np.concatenate(held)

    def rows(idx):
        out = np.empty((len(idx), ROW), np.uint8)  # (n,ROW): a frame's 64*64*3 bytes, then its weights' 64*64
        for k, i in enumerate(idx):  # seek + read, not np.memmap: mapped pages would count as the process's memory
            store.seek(int(i) * ROW)
            store.readinto(out[k])
        return out[:, :-64 * 64].reshape(-1, 64, 64, 3), out[:, -64 * 64:].reshape(-1, 64, 64)
    return rows, held, fg / (len(held) * 64 * 64)


def colour_weights(obs, mask):
    """Frames uint8 (T,64,64,3), foreground masks (T,64,64) -> weights uint8 (T,64,64), FG_UNIT a foreground pixel
    on average, spread so that each colour (4 levels a channel) of a frame's foreground weighs the same in all:
    hard mode's 9-pixel frog as much as a lane of cars (without it V draws the cars first, never the frog)."""
    q = obs[..., 0] // 64 * 16 + obs[..., 1] // 64 * 4 + obs[..., 2] // 64  # (T,64,64) colour bin 0..63
    out = np.zeros(mask.shape, np.uint8)
    for t in np.flatnonzero(mask.any(axis=(1, 2))):
        count = np.bincount(q[t][mask[t]], minlength=64)  # (64,) foreground pixels of each colour bin
        w = np.where(mask[t], 1.0 / np.maximum(count[q[t]], 1), 0)  # (64,64): each colour's pixels share weight 1
        w *= mask[t].sum() / w.sum()  # mean 1 over the foreground: V's balance of foreground and background stays
        out[t] = np.clip(np.round(FG_UNIT * w), 0, 255)
    return out


def random_policy(rng, n, up_prob, max_repeat):
    """act(): per env, a random action index held for 1..max_repeat steps, biased to UP to reach river and finish."""
    p = np.full(len(ACTIONS), (1 - up_prob) / (len(ACTIONS) - 1))
    p[UP] = up_prob
    action, left = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)

    def act():
        new = left == 0
        action[new] = rng.choice(len(ACTIONS), size=new.sum(), p=p)
        left[new] = rng.integers(1, max_repeat + 1, size=new.sum())
        left[:] -= 1
        return action.copy()
    return act


def collect(cfg):
    """Fill cfg.out with episodes 0..cfg.episodes-1; files already there are kept, never rewritten.

    Episodes are numbered in the order they finish in one seeded stream of cfg.num_envs envs, so
    the same arguments always give the same episodes. Resume replays the stream (procgen steps
    fast) and writes only the missing ones. Episodes still running at the end are dropped."""
    os.makedirs(cfg.out, exist_ok=True)
    made_with = os.path.join(cfg.out, "collect_config.json")  # a data dir is one seeded stream of episodes
    if os.path.exists(made_with):
        with open(made_with) as f:
            check_same_flags(dataclasses.asdict(cfg), json.load(f), made_with, free=("out", "episodes", "compress"))
    with open(made_with, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    missing = {i for i in range(cfg.episodes) if not os.path.exists(episode_path(cfg.out, i))}
    if not missing:
        print(f"collect: {cfg.out} already holds episodes 0..{cfg.episodes - 1}, nothing to do")
        return dict(episodes=0, frames=0, wins=0, env_steps=0, seconds=0.0)
    # Seeding, in one place: procgen's level stream and the random policy both come from cfg.seed.
    env = make_env(cfg.num_envs, cfg.distribution_mode, seed=cfg.seed)
    act = random_policy(np.random.default_rng(cfg.seed), cfg.num_envs, cfg.up_prob, cfg.max_repeat)
    # One entry per step for all envs at once (no per-env work while stepping); an episode is cut
    # out of it when it ends. history[0] is step `base`; env i's running episode began at start[i].
    history, base, start = [], 0, np.zeros(cfg.num_envs, dtype=np.int64)
    t0, finished, steps, frames, wins, writes = time.time(), 0, 0, 0, 0, []
    _, obs, _ = env.observe()
    # zlib releases the GIL: compressing in a thread overlaps with stepping procgen.
    with ThreadPoolExecutor(1) as writer, tqdm(total=len(missing), desc="collect", unit="ep", disable=None) as bar:
        while finished < cfg.episodes:
            a = act()  # (N,) action indices
            env.act(ACTIONS[a])
            rew, next_obs, first = env.observe()
            history.append((obs["rgb"], a, rew))  # procgen returns fresh arrays every step: no copy
            obs, steps = next_obs, steps + cfg.num_envs
            # CRUCIAL: procgen auto-resets. When first[i] is set, obs[i] is already the first frame
            # of the NEXT level and rew[i] is the last reward of the episode that ended.
            for i in np.flatnonzero(first):
                ep = history[start[i] - base:]  # the steps of env i's episode
                start[i] = base + len(history)
                if finished in missing:
                    T = len(ep)
                    reward, done = np.array([r[i] for _, _, r in ep], dtype=np.float32), np.arange(T) == T - 1
                    writes.append(writer.submit(
                        savez, episode_path(cfg.out, finished), compress=cfg.compress,
                        obs=np.stack([o[i] for o, _, _ in ep]),  # (T,64,64,3)
                        action=np.array([x[i] for _, x, _ in ep], dtype=np.int8), reward=reward, done=done))
                    frames, wins = frames + T, wins + (reward[-1] > 0)
                    bar.update(1)
                finished += 1
                if finished == cfg.episodes:
                    break
            drop = start.min() - base  # steps that no running episode needs any more
            del history[:drop]
            base += drop
            for w in [w for w in writes if w.done()]:
                w.result()  # a failed write (a full disk) raises here, not never
                writes.remove(w)
    for w in writes:
        w.result()
    dt, n = time.time() - t0, len(missing)
    print(f"collect: {n} new episodes ({cfg.episodes - n} already there), {frames} frames, "
          f"win fraction {wins / max(n, 1):.3f}, {steps} env steps in {dt:.1f}s = "
          f"{steps / dt:,.0f} env steps/s ({frames / dt:,.0f} frames written/s)")
    return dict(episodes=n, frames=frames, wins=int(wins), env_steps=steps, seconds=dt)


if __name__ == "__main__":
    interruptible(collect, cli(CollectConfig))
