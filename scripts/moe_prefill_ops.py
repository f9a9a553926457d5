"""Time each libtorch op of one MoE layer's prefill path (the grouped path of moe-models' layers/moe.rs)
at a real shape on the GPU, to see where the layer's time goes. Random bf16 weights; CUDA events; median.

    python3 scripts/moe_prefill_ops.py --tokens 8192 --experts 64 --k 6 --hidden 2048 --inter 1408 --shared 2816
"""
import argparse
import statistics

import torch


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--shared", type=int, default=2816)
    a = p.parse_args()
    dev, bf = "cuda", torch.bfloat16
    n, e, k, h, i = a.tokens, a.experts, a.k, a.hidden, a.inter
    torch.manual_seed(0)
    x = torch.randn(n, h, device=dev, dtype=bf)
    wg = torch.randn(e, h, device=dev) * 0.02
    gu_w = torch.randn(e, 2 * i, h, device=dev, dtype=bf) * 0.02
    d_w = torch.randn(e, h, i, device=dev, dtype=bf) * 0.02
    s_gu = torch.randn(2 * a.shared, h, device=dev, dtype=bf) * 0.02
    s_g, s_u = s_gu[: a.shared], s_gu[a.shared :]
    s_d = torch.randn(h, a.shared, device=dev, dtype=bf) * 0.02

    probs = torch.softmax(x.float() @ wg.T, -1)
    ids = probs.sort(dim=-1, descending=True, stable=True)[1][:, :k]
    keyed = ids.reshape(-1) % (e + 1)
    sorted_, perm = keyed.sort(stable=True)
    token = perm // k
    offs = torch.searchsorted(sorted_, torch.arange(e, device=dev), right=True).int()
    xg = x.index_select(0, token)
    gu = torch._grouped_mm(xg, gu_w.transpose(1, 2), offs=offs)
    act = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
    y = torch._grouped_mm(act, d_w.transpose(1, 2), offs=offs)
    wts = torch.rand(n, k, device=dev)
    act_s = torch.nn.functional.silu(x @ s_g.T) * (x @ s_u.T)
    m = n * k
    flops_routed = 2 * m * h * 3 * i

    rows = [
        ("router f32 linear + softmax", lambda: torch.softmax(x.float() @ wg.T, -1)),
        ("top-k select (sort + narrow)", lambda: probs.sort(dim=-1, descending=True, stable=True)[1][:, :k]),
        ("pair sort + searchsorted", lambda: torch.searchsorted(keyed.sort(stable=True)[0], torch.arange(e, device=dev), right=True)),
        ("gather x rows (index_select)", lambda: x.index_select(0, token)),
        ("grouped_mm gate_up", lambda: torch._grouped_mm(xg, gu_w.transpose(1, 2), offs=offs)),
        ("swiglu", lambda: torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]),
        ("grouped_mm down", lambda: torch._grouped_mm(act, d_w.transpose(1, 2), offs=offs)),
        (
            "combine, libtorch (mul, zeros, index_copy, sum)",
            lambda: torch.zeros(m, h, device=dev).index_copy(0, perm, y * wts.reshape(-1)[perm, None]).view(n, k, h).sum(1).to(bf),
        ),
        ("shared: gate + up (two linears)", lambda: (x @ s_g.T, x @ s_u.T)),
        ("shared: gate_up (one linear)", lambda: x @ s_gu.T),
        ("shared: down", lambda: act_s @ s_d.T),
    ]
    total = 0.0
    print(f"tokens {n}, experts {e}, k {k}, hidden {h}, inter {i}, shared {a.shared}")
    for name, fn in rows:
        ms = timed(fn)
        total += ms
        extra = ""
        if "grouped_mm" in name:
            extra = f"  ({flops_routed / 3 * (2 if 'gate' in name else 1) / ms / 1e9:.0f} TFLOP/s)"
        print(f"{name:<48} {ms:8.3f} ms{extra}")
    print(f"{'sum':<48} {total:8.3f} ms")


if __name__ == "__main__":
    main()
