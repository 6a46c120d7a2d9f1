"""Throughput of every stage on this machine, next to the naive way of doing it (one gym env per
episode, batch-1 network calls per step, as the seed and ctallec/world-models do), measured in the
same run with the same models, the same controllers and the same levels.

    python bench.py            # a table
    python bench.py --json     # ... and one JSON object as the last line of stdout
"""
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import collect
import controller
import danger
import mdnrnn
import vae


def bench_collect(episodes=2000, compress=True):
    """collect.py as a user runs it: vectorized envs, biased random policy, .npz writes."""
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
        s = collect.collect(collect.CollectConfig(out=d, episodes=episodes, num_envs=256, compress=compress))
    return s["env_steps"] / s["seconds"]


def vector_stepping(seconds=5.0, num=256):
    """Stepping alone, no writes: one ProcgenGym3Env of num envs, one C++ call per step."""
    env, rng = collect.make_env(num), np.random.default_rng(0)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        env.act(collect.ACTIONS[rng.integers(5, size=num)])
        env.observe()
        n += num
    return n / (time.time() - t0)


def naive_collect(seconds=5.0):
    """Stepping alone, no writes: one gym env, one action per Python call."""
    import gym
    env = gym.make("procgen:procgen-leaper-v0", distribution_mode="easy")
    env.reset()
    rng, n, t0 = np.random.default_rng(0), 0, time.time()
    while time.time() - t0 < seconds:
        _, _, done, _ = env.step(int(collect.ACTIONS[rng.integers(5)]))[:4]
        n += 1
        if done:
            env.reset()
    return n / (time.time() - t0)


def bench_vae(model, steps=8, batch=128):
    opt = torch.optim.Adam(model.parameters())
    x, w = torch.rand(batch, 3, 64, 64), torch.ones(batch, 1, 64, 64)
    t0 = time.time()
    for _ in range(steps):
        loss = vae.vae_loss(x, *model(x), w, 1.0, 0.5)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.time() - t0)


def bench_encoder(model, n=4096):
    frames = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    t0 = time.time()
    vae.encode(model, frames)
    return n / (time.time() - t0)


@torch.no_grad()
def naive_rollout(v, m, d, params, level_seeds, inputs, max_steps):
    """The loop of most World Models code: per candidate, per level, a gym env and batch-1 calls."""
    import gym
    steps, returns = 0, []
    W = torch.as_tensor(params, dtype=torch.float32).view(len(params), len(collect.ACTIONS), -1)  # (P,5,F+1)
    for p in range(len(params)):
        agent = controller.Agent(v, m, W[p], inputs, d)
        for s in level_seeds:
            env = gym.make("procgen:procgen-leaper-v0", start_level=int(s), num_levels=1, distribution_mode="easy")
            obs, ret, first = env.reset(), 0.0, np.ones(1, dtype=bool)
            agent.reset(1)
            for _ in range(max_steps):
                action = agent.act(obs[None], first)[0]  # a procgen id, batch of one
                first[:] = False
                obs, r, done, _ = env.step(int(action))[:4]
                ret, steps = ret + r, steps + 1
                if done:
                    break
            returns.append(ret)
    return np.array(returns).reshape(len(params), len(level_seeds)), steps


def bench_dream(m, Z, threads, candidates=32, episodes=256):
    """Agent steps/s of M's dream (mdnrnn.dream) as controller.py plays it: 32 candidates x 256 dream episodes
    (--dream-episodes) in one batch, C on [z, h] (no frames, so no D), M's done head set to end episodes after
    ~60 steps as real ones do."""
    torch.set_num_threads(threads)
    with torch.no_grad():
        m.head.bias[-2:] = torch.tensor([-10.0, -math.log(59)])  # win ~never, done with probability 1/60
    n_features = sum(controller.input_sizes("zh", Z, m.hidden).values())
    W = torch.randn(candidates * episodes, 5, n_features + 1) * 0.1  # (P*E,5,F+1): one C per dream episode

    def policy(z, h, idx):
        return controller.choose(W[idx], controller.features(z, h, "zh"))
    t0 = time.time()
    _, lengths = mdnrnn.dream(m, policy, torch.randn(len(W), Z), tau=1.15, max_steps=250)
    return lengths.sum().item() / (time.time() - t0)


def main(as_json):
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    workers = os.cpu_count() or 1
    tmp = tempfile.mkdtemp()
    Z = 128  # the default preset's sizes: spatial z 128, LSTM 256, 5 Gaussians, D; untrained (speed only)
    v, m, d = vae.ConvVAE(Z, spatial=True).eval(), mdnrnn.MDNRNN(Z, 256, 5).eval(), danger.DangerNet().eval()
    vpath, mpath, dpath = (os.path.join(tmp, f) for f in ("vae.pt", "mdnrnn.pt", "danger.pt"))
    torch.save(dict(model=v.state_dict(), config=dict(z_dim=Z, spatial=True)), vpath)
    torch.save(dict(model=m.state_dict(), config=dict(hidden=256, gaussians=5), z_dim=Z), mpath)
    torch.save(dict(model=d.state_dict(), config={}), dpath)
    v, m, d = vae.load_vae(vpath), mdnrnn.load_mdnrnn(mpath), danger.load_danger(dpath)  # as every stage loads them
    inputs = "zhd"  # the default controller: [z, h, D's logit]
    n_features = sum(controller.input_sizes(inputs, Z, 256).values())
    params = np.random.default_rng(1).normal(0, 0.1, (32, 5 * (n_features + 1)))
    params[:, collect.UP * (n_features + 1) + n_features] += 1.0  # lean on UP: episodes of a realistic length
    levels = controller.level_draw(0, 0, 8)
    r = {}
    torch.set_num_threads(workers)
    r["collect_steps_per_s"] = bench_collect()
    r["collect_uncompressed_steps_per_s"] = bench_collect(compress=False)
    r["vector_stepping_steps_per_s"] = vector_stepping()
    r["naive_stepping_steps_per_s"] = naive_collect()
    r["vae_train_frames_per_s"] = bench_vae(vae.ConvVAE(Z, spatial=True))
    r["flat_vae_train_frames_per_s"] = bench_vae(vae.ConvVAE(32))  # Ha's V, for comparison
    r["encoder_frames_per_s"] = bench_encoder(v)
    with controller.make_pool("process", workers, vpath, mpath, dpath) as pool:
        # Warm-up, as in training where the pool lives for the whole run: each worker's first env
        # loads procgen's library (~1 s), once.
        list(pool.map(controller.rollout_job, [(params[:1], levels[:1], "easy", inputs, 1)] * 4 * workers))
        t0 = time.time()
        ours, steps = controller.fitness(pool, params, levels, "easy", inputs, workers, 250)
        r["rollout_steps_per_s"] = steps / (time.time() - t0)
    torch.set_num_threads(1)  # the naive loop gets one core per process too: run it on 4 candidates
    naive_rollout(v, m, d, params[:1], levels[:1], inputs, 1)  # warm-up: gym and procgen load once
    t0 = time.time()
    naive, nsteps = naive_rollout(v, m, d, params[:4], levels, inputs, 250)
    r["naive_rollout_steps_per_s"] = nsteps / (time.time() - t0) * workers  # scaled to all cores, generously
    r["rollouts_identical"] = bool(np.array_equal(naive.mean(1), ours[:4]))
    r["dream_steps_per_s"] = bench_dream(m, Z, workers)
    r["dream_speedup"] = r["dream_steps_per_s"] / r["rollout_steps_per_s"]
    r["rollout_speedup"] = r["rollout_steps_per_s"] / r["naive_rollout_steps_per_s"]
    r["stepping_speedup"] = r["vector_stepping_steps_per_s"] / r["naive_stepping_steps_per_s"]
    for k, x in r.items():
        print(f"{k:<28} {x:>12,.1f}" if not isinstance(x, bool) else f"{k:<28} {x!s:>12}")
    if as_json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main("--json" in sys.argv[1:])
