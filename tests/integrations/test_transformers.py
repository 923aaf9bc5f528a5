"""bnlab on real Hugging Face transformers: tiny randomly initialized configs built locally, nothing
downloaded.

* Curvature through ``scaled_dot_product_attention`` (double backward): HVPs and the top eigenvalue
  of a BERT and a GPT-2 against autograd's full Hessian of a small slice of parameters, computed
  on a copy of the model with the eager (plain matmul/softmax) attention.
* The user's attention-backend choice is unchanged after a call; without bnlab's backend switch
  the double backward really fails (so the test of the fix can fail).
* Dropout in train mode: repeated calls agree bit for bit, and the HVP is the Hessian of the loss
  with the masks drawn from the call's RNG state.
* Every registered probe runs through ``Monitor`` on dict batches and leaves training
  bit-identical.
* ``find_scale_invariant``: a block with QK-LayerNorm has its query and key projections found;
  post-LN BERT and pre-LN GPT-2 have none.
"""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bnlab.curvature import model_hvp, model_top_eigenvalues  # noqa: E402
from bnlab.landscape import probe_model_along_gradient  # noqa: E402
from bnlab.monitor import Monitor  # noqa: E402
from bnlab.probes.registry import PROBES, make_probe  # noqa: E402
from bnlab.scale import find_scale_invariant  # noqa: E402

transformers.logging.set_verbosity_error()

# the tiny models, their batches and the Hessian reference: one definition, shared with the device check
# (benchmarks/gpu_probe_check.py, which runs the same checks on a GPU)
_CHECK_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_probe_check.py"
_spec = importlib.util.spec_from_file_location("gpu_probe_check", _CHECK_PATH)
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)
VOCAB, SEQ, MODELS = device_check.VOCAB, device_check.SEQ, device_check.MODELS
bert, gpt2, bert_batch, gpt2_batch = device_check.bert, device_check.gpt2, device_check.bert_batch, device_check.gpt2_batch
_reference_hessian = device_check.reference_hessian


def _slice_setup(kind):
    """The model (sdpa, eval, dropout 0: the fused kernel without double backward is the one
    chosen), its eager-attention twin with the same weights (the reference), the batch, and the
    names of the slice; every other parameter frozen."""
    make, make_batch, names = MODELS[kind]
    return (*device_check.slice_setup(make, make_batch, names), names)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_hvp_and_top_eigenvalue_match_autograd_hessian_of_a_slice(kind):
    model, ref, batch, names = _slice_setup(kind)
    H, sizes = _reference_hessian(ref, batch, names)
    assert H.abs().max() > 1e-3  # a nontrivial slice
    # without the math backend the double backward through SDPA fails (torch 2.13, pinned): the fix is needed
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(model(**batch).loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum((t * t).sum() for t in g), params)

    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled())
    gen = torch.Generator().manual_seed(0)
    vflat = torch.randn(H.shape[0], generator=gen)
    v = {n: t.reshape(p.shape) for n, t, p in zip(names, torch.split(vflat, sizes),
                                                   [dict(model.named_parameters())[n] for n in names])}
    hv = model_hvp(model, batch, None, v)
    got = torch.cat([hv[n].reshape(-1) for n in names])
    torch.testing.assert_close(got, H @ vflat, rtol=2e-4, atol=2e-5)
    assert flags == (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled())

    lam, info = model_top_eigenvalues(model, batch, k=1, max_iter=60, tol=1e-6)
    ev = torch.linalg.eigvalsh(H.double())
    ref_top = float(ev.max())  # the largest algebraic eigenvalue (which="largest", the default)
    assert info.converged
    assert abs(float(lam[0]) - ref_top) <= 1e-3 * max(1.0, abs(ref_top))


def test_a_users_backend_choice_is_kept():
    model, _, batch, _ = _slice_setup("bert")
    v = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # the user's choice
        hv = model_hvp(model, batch, None, v)
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
    assert all(torch.isfinite(t).all() for t in hv.values())


def test_dropout_masks_fixed_per_computation_on_bert():
    model = bert(dropout=0.1).train()
    names = ["bert.encoder.layer.0.attention.self.query.bias", "classifier.weight"]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    batch = bert_batch()
    v = {n: torch.randn_like(dict(model.named_parameters())[n]) for n in names}
    torch.manual_seed(7)
    state = torch.get_rng_state()
    runs = [model_hvp(model, batch, None, v) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)  # the wrapper restores the RNG
    for r in runs[1:]:
        assert all(torch.equal(r[n], runs[0][n]) for n in names)
    lams = [float(model_top_eigenvalues(model, batch, k=1, max_iter=8)[0][0]) for _ in range(3)]
    assert lams[0] == lams[1] == lams[2]
    scans = [probe_model_along_gradient(model, batch, None, [0.1, 0.3], vectorize="auto").losses for _ in range(2)]
    assert torch.equal(scans[0], scans[1])

    # reference: autograd's Hessian of the loss with the masks drawn from the same RNG state
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]

    def loss_of(flat):
        torch.set_rng_state(state)
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.functional_call(model, {n: t.reshape(s) for n, t, s in
                                                      zip(names, torch.split(flat, sizes), shapes)}, (), batch).loss

    H = torch.autograd.functional.hessian(loss_of, torch.cat([params[n].detach().reshape(-1) for n in names]))
    torch.set_rng_state(state)
    vflat = torch.cat([v[n].reshape(-1) for n in names])
    got = torch.cat([runs[0][n].reshape(-1) for n in names])
    torch.testing.assert_close(got, H @ vflat, rtol=2e-4, atol=2e-5)
    # the masks matter: in eval mode (no dropout) the HVP is another one
    hv_eval = model_hvp(copy.deepcopy(model).eval(), batch, None, v)
    assert not torch.allclose(torch.cat([hv_eval[n].reshape(-1) for n in names]), got, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- every probe, through Monitor


def _train(make, make_batch, probe_name=None, steps=3):
    model = make(dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [make_batch(seed=10 + i) for i in range(steps)]
    probes = [] if probe_name is None else [make_probe(probe_name, model, make_batch(n=4, seed=99), None, every=1)]
    records = []
    monitor = Monitor(model, opt, probes, log=records)
    torch.manual_seed(0)
    for batch in batches:
        with monitor.step(batch) as s:
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            s.loss = loss
            opt.step()
    return model, records, probes, torch.get_rng_state()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_registered_probe_runs_on_dict_batches_and_leaves_training_bit_identical(kind):
    make, make_batch, _ = MODELS[kind]
    base, _, _, rng_a = _train(make, make_batch)
    failures = []
    for name in sorted(PROBES):
        try:
            model, records, probes, rng_b = _train(make, make_batch, name)
        except Exception as exc:  # collect, to report every probe that fails at once
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), (name, k)
        assert torch.equal(rng_a, rng_b), name
        prefix = probes[0].name + "/"
        recorded = [v for r in records for k, v in r.items() if k.startswith(prefix)]
        if name != "scale-invariant":  # transformers have no scale-invariant group: nothing to record
            finite = [v for v in recorded if isinstance(v, (int, float)) and math.isfinite(v)]
            assert finite, f"probe {name} recorded no finite number"
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- scale invariance


class QKNormBlock(nn.Module):
    """Embedding, one attention block with QK-LayerNorm (per head, over the head dimension,
    LayerNorm with a weight and no bias), a residual connection, a final LayerNorm and a
    classifier on the mean token. Projections without bias unless ``proj_bias``."""

    def __init__(self, vocab=VOCAB, d=16, heads=2, classes=3, proj_bias=False, qk_norm=True):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.emb = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=proj_bias)
        self.k = nn.Linear(d, d, bias=proj_bias)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.q_norm = nn.LayerNorm(self.dh, bias=False) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.dh, bias=False) if qk_norm else nn.Identity()
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, labels=None):
        x = self.emb(input_ids)
        b, t, d = x.shape

        def heads(z):
            return z.view(b, t, self.h, self.dh)

        q = self.q_norm(heads(self.q(x))).transpose(1, 2)
        k = self.k_norm(heads(self.k(x))).transpose(1, 2)
        v = heads(self.v(x)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        logits = self.head(self.ln(x + self.o(a)).mean(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _names(groups):
    return {g.param_name: g.per_channel for g in groups}


def test_find_scale_invariant_finds_the_qk_normalized_projections():
    torch.manual_seed(0)
    batch = bert_batch()
    batch.pop("attention_mask")
    found = find_scale_invariant(QKNormBlock(), batch)  # the model's own loss
    # q and k as a whole, not per row (the LayerNorm mixes the rows of a head). The embedding too:
    # with q and k normalized, attention is invariant to the scale of x, v = W_v x and o(a) scale
    # with it, so x + o(a) does, and the final LayerNorm removes that scale.
    expected = {"q.weight": False, "k.weight": False, "emb.weight": False}
    assert _names(found) == expected
    with_loss_fn = find_scale_invariant(QKNormBlock(), {"input_ids": batch["input_ids"], "labels": batch["labels"]},
                                        F.cross_entropy)
    assert _names(with_loss_fn) == expected
    torch.manual_seed(0)
    biased = QKNormBlock(proj_bias=True)
    with torch.no_grad():
        biased.q.bias.normal_()
        biased.k.bias.normal_()
    assert _names(find_scale_invariant(biased, batch)) == {}  # a bias before the norm breaks it
    torch.manual_seed(0)
    assert _names(find_scale_invariant(QKNormBlock(qk_norm=False), batch)) == {}  # no norm, no invariance


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_find_scale_invariant_finds_none_in_post_ln_bert_and_pre_ln_gpt2(kind):
    make, make_batch, _ = MODELS[kind]
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert find_scale_invariant(model, make_batch()) == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_output_gradient_of_the_models_own_loss():
    from bnlab.adapters import logits_and_output_grad

    model = bert(dropout=0.1).train()
    batch = bert_batch()
    state = torch.get_rng_state()
    z, g = logits_and_output_grad(model, batch)  # through BERT's own loss
    z2, g2 = logits_and_output_grad(model, batch, F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(z, z2)  # the same dropout masks in every pass
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(g, (torch.softmax(z, -1) - F.one_hot(batch["labels"], 3)) / len(z))

    lm = gpt2().eval()
    b = gpt2_batch()
    z, g = logits_and_output_grad(lm, b)  # GPT-2 shifts the labels inside its loss
    leaf = z.clone().requires_grad_(True)
    ref = F.cross_entropy(leaf[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1))
    (g_ref,) = torch.autograd.grad(ref, leaf)
    torch.testing.assert_close(g, g_ref)


def test_activation_quantiles_take_a_transformers_channels_from_the_last_dimension():
    from bnlab.probes import ActivationQuantiles

    model = bert(dropout=0.0).train()
    batch = bert_batch()
    seen = []
    h = model.bert.embeddings.LayerNorm.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(**batch)
    h.remove()
    ref = seen[0].reshape(-1, 32).double()  # (N * tokens, hidden)
    records = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = Monitor(model, opt, [ActivationQuantiles("bert.embeddings.LayerNorm", every=1)], log=records)
    with monitor.step(batch) as s:
        s.loss = model(**batch).loss
        s.loss.backward()
        opt.step()
    rec = records[0]
    assert sum(k.endswith("/mean") for k in rec) == 32  # hidden channels, not the 10 token positions
    for c in (0, 7, 31):
        assert rec[f"act_q/{c}/mean"] == pytest.approx(float(ref[:, c].mean()), rel=1e-6, abs=1e-9)
        assert rec[f"act_q/{c}/q50"] == pytest.approx(float(ref[:, c].quantile(0.5)), rel=1e-6, abs=1e-9)


def test_the_device_check_script_passes_on_the_cpu_and_refuses_bad_input(capsys, monkeypatch):
    """benchmarks/gpu_probe_check.py (the check a GPU session runs: HVP through SDPA against autograd's
    Hessian, every probe bit-identical) passes here on the CPU, fails when the attention backend switch
    is removed, and answers a device it cannot use with exit status 2."""
    mod = device_check
    assert mod.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nok   ") == 2 * (1 + len(PROBES)) and " 0 failed" in out
    import contextlib

    import bnlab.curvature

    monkeypatch.setattr(bnlab.curvature, "math_attention", contextlib.nullcontext)  # no backend switch
    assert mod.main(["--device", "cpu"]) == 1
    assert "FAIL bert: HVP through SDPA" in capsys.readouterr().out
    monkeypatch.undo()
    assert mod.main(["--device", "tpu"]) == 2
    assert "accepted: cuda, cuda:N, cpu" in capsys.readouterr().err
