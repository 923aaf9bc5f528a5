"""The device check of the probes and the curvature tools on real transformers (issue 17), for a machine
with a CUDA GPU. It runs on the CPU too (``--device cpu``), which is how it is tested here.

Run:  .venv/bin/python benchmarks/gpu_probe_check.py [--device cuda]

On tiny randomly initialized Hugging Face configs (nothing downloaded; needs ``transformers``, in the
``test`` extra), on the device:

1. **Double backward through ``scaled_dot_product_attention``.** The Hessian-vector product of a BERT
   and a GPT-2 with the fused attention kernels (``attn_implementation="sdpa"``) against autograd's full
   Hessian of a small slice of parameters, computed on a twin with the eager (matmul/softmax) attention
   and the same weights; the top eigenvalue against that Hessian's largest eigenvalue; the user's
   attention-backend flags unchanged afterwards.
2. **Every registered probe** through :class:`bnlab.monitor.Monitor` on dict batches for three SGD
   steps, with deterministic algorithms on: the weights bit-identical to the same steps without the
   probe, and at least one finite number recorded.

Prints one line per check (``ok`` or ``FAIL`` with the numbers) and exits 1 if any failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: weights comparable bit for bit

import torch  # noqa: E402

VOCAB, SEQ = 64, 10


def bert(dropout=0.0, attn="sdpa", dev="cpu"):
    """A tiny randomly initialized BERT classifier (2 layers, width 32, 3 labels), seed 0."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, attn_implementation=attn)
    return BertForSequenceClassification(cfg).to(dev)


def gpt2(dropout=0.0, attn="sdpa", dev="cpu"):
    """A tiny randomly initialized GPT-2 language model (2 layers, width 32), seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).to(dev)


def bert_batch(n=8, seed=1, dev="cpu"):
    """A dict batch for :func:`bert`: token ids, an attention mask with padding in half the rows, labels."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[: n // 2, SEQ - 3:] = 0  # padding in half the sequences
    b = {"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g), "attention_mask": mask,
         "labels": torch.randint(0, 3, (n,), generator=g)}
    return {k: v.to(dev) for k, v in b.items()}


def gpt2_batch(n=4, seed=1, dev="cpu"):
    """A dict batch for :func:`gpt2`: token ids, which are also the labels."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed)).to(dev)
    return {"input_ids": ids, "labels": ids}


#: kind -> (model builder, batch builder, the names of the parameter slice whose Hessian is checked)
MODELS = {
    "bert": (bert, bert_batch, ["bert.encoder.layer.0.attention.self.query.bias",
                                "bert.encoder.layer.0.attention.self.key.bias", "classifier.weight"]),
    "gpt2": (gpt2, gpt2_batch, ["transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight"]),
}


def slice_setup(make, make_batch, names, dev="cpu"):
    """The model (sdpa, eval, dropout 0: the fused kernel without double backward is the one chosen), its
    eager-attention twin with the same weights (the reference), and the batch; every parameter but
    ``names`` frozen."""
    model, ref = make(dev=dev).eval(), make(attn="eager", dev=dev).eval()
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        for n, p in m.named_parameters():
            p.requires_grad_(n in names)
    return model, ref, make_batch(dev=dev)


def reference_hessian(ref, batch, names):
    """Autograd's full Hessian of ``ref``'s own loss on ``batch`` with respect to the parameters ``names``
    (flattened and concatenated in that order), and their sizes."""
    params = dict(ref.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]

    def loss_of(flat):
        parts = torch.split(flat, sizes)
        return torch.func.functional_call(ref, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (), batch).loss

    return torch.autograd.functional.hessian(loss_of, torch.cat([params[n].detach().reshape(-1) for n in names])), sizes


def _flags():
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.math_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled()


def check_curvature(kind, make, make_batch, names, dev) -> list[str]:
    """HVP and top eigenvalue of the sdpa model against the eager twin's autograd Hessian of a slice."""
    from bnlab.curvature import model_hvp, model_top_eigenvalues

    model, ref, batch = slice_setup(make, make_batch, names, dev)
    H, sizes = reference_hessian(ref, batch, names)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0)).to(dev)
    own = dict(model.named_parameters())
    vd = {n: t.reshape(own[n].shape) for n, t in zip(names, torch.split(v, sizes))}
    before = _flags()
    hv = torch.cat([model_hvp(model, batch, None, vd)[n].reshape(-1) for n in names])
    want = H @ v
    err = float((hv - want).abs().max() / want.abs().max())
    lam, info = model_top_eigenvalues(model, batch, k=1, max_iter=60, tol=1e-6)
    top = float(torch.linalg.eigvalsh(H.double()).max())
    lam_err = abs(float(lam[0]) - top) / max(1.0, abs(top))
    ok = err < 1e-3 and lam_err < 1e-3 and info.converged and _flags() == before
    return [f"{'ok  ' if ok else 'FAIL'} {kind}: HVP through SDPA vs autograd Hessian of {H.shape[0]} parameters: max rel. "
            f"error {err:.1e}; top eigenvalue {float(lam[0]):.6g} vs {top:.6g} (rel. {lam_err:.1e}, converged "
            f"{info.converged}); backend flags kept {_flags() == before}"]


def check_probes(kind, make, make_batch, dev) -> list[str]:
    """Every registered probe through Monitor: weights bit-identical to the run without it."""
    from bnlab.monitor import Monitor
    from bnlab.probes.registry import PROBES, make_probe

    def run(name):
        model = make(dropout=0.1, dev=dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        probes = [] if name is None else [make_probe(name, model, make_batch(n=4, seed=99, dev=dev), None, every=1)]
        records: list = []
        mon = Monitor(model, opt, probes, log=records)
        torch.manual_seed(0)
        for i in range(3):
            batch = make_batch(seed=10 + i, dev=dev)
            with mon.step(batch) as s:
                opt.zero_grad()
                s.loss = model(**batch).loss
                s.loss.backward()
                opt.step()
        return model, records, probes

    base, _, _ = run(None)
    out = []
    for name in sorted(PROBES):
        t0 = time.perf_counter()
        try:
            model, records, probes = run(name)
        except Exception as exc:  # noqa: BLE001  (every probe is reported)
            out.append(f"FAIL {kind}: probe {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        same = all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))
        prefix = probes[0].name + "/"
        finite = [v for r in records for k, v in r.items() if k.startswith(prefix) and isinstance(v, (int, float))
                  and math.isfinite(v)]
        ok = same and (finite or name == "scale-invariant")  # transformers have no scale-invariant group
        out.append(f"{'ok  ' if ok else 'FAIL'} {kind}: probe {name}: weights bit-identical {same}, "
                   f"{len(finite)} finite numbers, {time.perf_counter() - t0:.1f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="device check of the probes and curvature tools on tiny transformers")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {a.device}: CUDA is not available here; accepted: cpu, or run on a machine with a GPU", file=sys.stderr)
        return 2
    if not a.device.startswith(("cuda", "cpu")):
        print(f"--device {a.device!r}: accepted: cuda, cuda:N, cpu", file=sys.stderr)
        return 2
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: pip install 'bnlab[test]' (or transformers)", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    dev = torch.device(a.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {dev} ({name}), torch {torch.__version__}, transformers {transformers.__version__}")
    lines = []
    for kind, (make, make_batch, names) in MODELS.items():
        try:
            lines += check_curvature(kind, make, make_batch, names, dev)
        except Exception as exc:  # noqa: BLE001  (reported as a failed check)
            lines.append(f"FAIL {kind}: HVP through SDPA: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        lines += check_probes(kind, make, make_batch, dev)
    for line in lines:
        print(line)
    failed = sum(line.startswith("FAIL") for line in lines)
    print(f"{len(lines) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
