"""What every dream probe of docs/ does with its world model, whatever the model: fit it on the run's encoded
episodes, dream under constant actions, draw dreams beside the real game, and search C by CMA-ES in the dream with
real checks (docs/probe_grid_dream.py: the conv transition on V's grid; docs/probe_frog_dream.py: the frog as an
object). A dream here is dream(model, mdn, policy, z0 (N,Z), tau, max_steps) -> returns (N,), lengths (N,), where
policy(z (n,Z), h (n,H), the death logit of UP (n,) or None, idx (n,)) -> action indices (n,).

Run alone, it prints the table the probes print, for M's own dream (mdnrnn.dream, the LSTM and MDN of the run):

    python docs/dream_bench.py --run runs --tau 1.0
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, ACTION_NAMES, MAX_STEPS, NONE, UP, check_flags, cli, make_env  # noqa: E402
from controller import CConfig, Agent, choose, cma_generation, features, input_sizes, level_draw, make_search  # noqa
from evaluate import Always, play, summarize  # noqa: E402
from mdnrnn import dream, load_mdnrnn  # noqa: E402
from probe_rules import Counting  # noqa: E402
from vae import load_vae, to_input  # noqa: E402


@dataclass
class BenchConfig:
    run: str = "runs"  # directory holding vae.pt and mdnrnn.pt
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty (the run's)
    tau: float = 1.0  # the dream's temperature (Ha's: the mixture's logits / tau, its spread * sqrt(tau))
    episodes: int = 256  # dreams per constant action, from held-out first frames
    seed: int = 0  # seeds the dreams

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1), above=dict(tau=0))


def fit(model, D, T, cfg, loss_fn, held_out, name):
    """Adam on loss_fn(model, D, window starts (B,), cfg.unroll) for cfg.steps steps; every 500 steps and at the end
    held_out(model, T) -> (a dict, its line) is printed. -> the model (eval mode), the last dict."""
    rng, opt = np.random.default_rng(cfg.seed), torch.optim.Adam(model.parameters(), 1e-3)
    starts = np.flatnonzero(D["left"].numpy() >= cfg.unroll - 1)  # windows inside one episode
    print(f"{name} model: {sum(p.numel() for p in model.parameters()):,} parameters, {len(D['a'])} training steps "
          f"({int(D['death'].sum())} deaths, {int(D['win'].sum())} wins), {len(T['a'])} held out")
    t0 = time.time()
    for step in range(cfg.steps):
        loss = loss_fn(model, D, torch.from_numpy(starts[rng.integers(0, len(starts), cfg.batch)]), cfg.unroll)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == cfg.steps:
            with torch.no_grad():
                row, line = held_out(model, T)
            print(f"{name} step {step + 1}: loss {loss.item():.1f}, held out: {line}, "
                  f"{(step + 1) / (time.time() - t0):.1f} steps/s", flush=True)
    return model.eval(), row


@torch.no_grad()
def write_strip(vae, cfg, path, dream_frames, n=4, steps=24, every=6):
    """Rows of frames: for each of n held-out levels, the real game under UP every `every` steps (NONE between) above
    dream_frames(V's z of its first frame (n,Z), the actions [(n,)] * steps) -> its frames (n,steps+1,64,64,3)."""
    import imageio.v2 as imageio
    actions, rows = [torch.full((n,), UP if t % every == 0 else NONE) for t in range(steps)], []
    real = real_frames(cfg.distribution_mode, actions, 1_000_003)  # (n,T+1,64,64,3)
    dream = dream_frames(first_z(vae, n, cfg, 1_000_003), actions)  # (n,T+1,64,64,3)
    for i in range(n):
        rows += [np.concatenate(real[i], 1), np.concatenate(dream[i], 1)]  # (64,T*64,3) each
    imageio.imwrite(path, np.concatenate(rows, 0))
    print(f"wrote {path}: real (odd rows) and dreamt (even rows), UP every {every} steps")


@torch.no_grad()
def dream_loop(step, mdn, n, max_steps=MAX_STEPS):
    """What every dream's loop shares, for N episodes at once: step(idx (n,), h (n,H)) moves the model's own state of
    the episodes idx still going and returns their z (n,Z), action indices (n,), win and death logits (n,) each; M's
    LSTM remembers the z's and actions (C's h); a win or death is sampled. -> returns (N,) (10 a win), lengths (N,)."""
    h, c = torch.zeros(2, 1, n, mdn.hidden).unbind()  # M's memory, each (1,N,H)
    ret, length, alive = torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    for _ in range(max_steps):
        idx = alive.nonzero()[:, 0]  # (n,) the episodes still going
        z, a, win, death = step(idx, h[0, idx])
        h[:, idx], c[:, idx] = mdn.advance(z, a, (h[:, idx], c[:, idx]))
        win, death = torch.bernoulli(torch.sigmoid(win)), torch.bernoulli(torch.sigmoid(death))  # (n,) each
        ret[idx], length[idx] = ret[idx] + 10 * win, length[idx] + 1
        alive[idx] = (win == 0) & (death == 0)
        if not alive.any():
            break
    return ret, length


def real_frames(distribution_mode, actions, seed):
    """The real game's frames (n,T+1,64,64,3) from the first frames of n levels of seed's stream, under the action
    indices [(n,)] * T. CRUCIAL: a level that ends restarts; its frames go on with the next level."""
    env = make_env(len(actions[0]), distribution_mode, seed=seed)
    frames = [env.observe()[1]["rgb"]]  # [(n,64,64,3)]
    for a in actions:
        env.act(np.asarray(ACTIONS)[np.asarray(a)])
        frames.append(env.observe()[1]["rgb"])
    return np.stack(frames, 1)


def first_z(vae, n, cfg, seed):
    """V's mu (n,Z) of the first frames of n levels of seed's stream."""
    return vae.encode(to_input(make_env(n, cfg.distribution_mode, seed=int(seed)).observe()[1]["rgb"]))[0]


def constant_table(dream, model, mdn, z0, cfg):
    """Dreams (the model's, played by dream) from z0 (E,Z), V's z of held-out first frames, per constant action."""
    torch.manual_seed(cfg.seed)
    table = {}
    print(f"{cfg.episodes} dreams per constant action at tau {cfg.tau}, from held-out first frames:")
    for a, name in enumerate(ACTION_NAMES):
        ret, length = dream(model, mdn, lambda z, h, up, idx: torch.full((len(idx),), a), z0, cfg.tau)
        won, died = (ret > 0).float().mean().item(), ((ret == 0) & (length < MAX_STEPS)).float().mean().item()
        table[name] = dict(win=won, death=died, length=length.float().mean().item())
        print(f"  always-{name:<5} wins {won:.1%}, dies {died:.1%}, mean length {length.float().mean():.0f}")
    return table


def search_c(model, vae, mdn, cfg, dream, hop=None, inputs="zhm"):
    """C on [z, h, the death logit of UP] (or those in inputs) by CMA-ES from zero, fitness from dream(model, ...)
    only; the CMA mean plays real validation levels every 5 generations (logged, never searched on). hop: C's m in
    the game (model.death)."""
    ccfg = CConfig(inputs=inputs, popsize=cfg.popsize, danger_prior=0.0, seed=cfg.seed)
    es, env_steps = make_search(ccfg, input_sizes(inputs, vae.z_dim, mdn.hidden)), 0
    mdn.hop = model.death if hop is None else hop  # controller.Agent reads C's m from M's hop head
    agent = lambda w: Agent(vae, mdn, torch.as_tensor(w, dtype=torch.float32).view(len(ACTIONS), -1), inputs,
                            distribution_mode=cfg.distribution_mode)

    def dream_score(X, gen, episodes):
        z0 = first_z(vae, episodes, cfg, level_draw(cfg.seed, gen, 1)[0])  # (E,Z)
        W = torch.as_tensor(X, dtype=torch.float32).view(len(X), len(ACTIONS), -1).repeat_interleave(len(z0), 0)
        ret, length = dream(model, mdn, lambda z, h, up, idx: choose(W[idx], features(z, h, inputs, up)),
                            z0.repeat(len(X), 1), cfg.tau, cfg.max_steps)  # dream p*E+e: candidate p's, start e
        return ret.view(len(X), -1).mean(1).numpy(), int(length.sum())

    for gen in range(cfg.generations):
        t0 = time.time()
        X, fit, steps = cma_generation(es, lambda X: dream_score(X, gen, cfg.dream_episodes))
        line = (f"C generation {gen + 1}: dream mean {fit.mean():.2f} best {fit.max():.2f}, "
                f"{steps / (time.time() - t0):,.0f} dream steps/s")
        if (gen + 1) % 5 == 0 or gen + 1 == cfg.generations:
            ret, length = play(agent(es.mean), cfg.check_levels, 10**9 + 7, cfg.distribution_mode, desc="real check")
            env_steps += int(length.sum())
            line += (f"; CMA mean: dream {dream_score(es.mean[None], gen, 256)[0][0]:.2f}, real validation wins "
                     f"{(ret > 0).mean():.1%} (real env steps so far {env_steps:,})")
        print(line, flush=True)
    policy = Counting(agent(es.mean))  # also counts the steps from each episode's last UP to its end
    ret, length = play(policy, cfg.test_episodes, 1_000_003, cfg.distribution_mode, desc="held-out")
    ups, _ = play(Always(UP), cfg.test_episodes, 1_000_003, cfg.distribution_mode, desc="always-UP")
    s, died = summarize(ret, length), (ret <= 0) & (length < MAX_STEPS)  # (E,): ended without the win before the cap
    s.update(died_hopping=float((died & (policy.final <= 5)).mean()), died_waiting=float((died & (policy.final > 5))
             .mean()), timeout=float((length >= MAX_STEPS).mean()))  # as docs/probe_rules.py counts them
    print(f"C searched in the dream, held out: {s['win_rate']:.1%} {[round(x, 3) for x in s['ci95']]} of "
          f"{cfg.test_episodes} levels, mean length {s['mean_length']:.0f} (always-UP {(ups > 0).mean():.1%}); died "
          f"within 5 steps of an UP {s['died_hopping']:.1%}, later {s['died_waiting']:.1%}, timeout {s['timeout']:.1%}")
    return dict(s, always_up=float((ups > 0).mean()), env_steps=env_steps)


def m_dream(model, mdn, policy, z0, tau=1.0, max_steps=MAX_STEPS):
    """M's own dream (mdnrnn.dream) as a dream of this module: model is M itself; C gets no death logit."""
    return dream(mdn, lambda z, h, idx: policy(z, h, None, idx), z0, tau, max_steps)


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    return constant_table(m_dream, mdn, mdn, first_z(vae, cfg.episodes, cfg, 1_000_003), cfg)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(BenchConfig))
