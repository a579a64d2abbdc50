"""Intra-document attention masking (data.document_masking): positions restart after EOS, and a packed
document's logits equal those of the same document alone; held-out losses and `cpt train` use it."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from cpt.data.masking import document_position_ids
from cpt.lm_loss import model_inputs
from cpt.evaluate import _batch_loss_sum, heldout_loss

EOS = 1


def llama(attn: str = "sdpa"):
    return tiny_llama(50, kv_heads=2, max_position_embeddings=64, attn_implementation=attn, training=False)


def test_position_ids_restart_after_each_eos():
    rows = torch.tensor([
        [5, 6, EOS, 7, 8, 9, EOS, 4],   # two boundaries
        [EOS, 3, 3, 3, 3, 3, 3, EOS],   # EOS first (the end of a document cut at the row start) and last
        [2, 2, 2, 2, 2, 2, 2, 2],       # no EOS: an ordinary causal row
    ])
    assert document_position_ids(rows, EOS).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]
    with pytest.raises(ValueError):
        document_position_ids(rows[0], EOS)
    assert model_inputs(rows, None) == {"input_ids": rows, "use_cache": False}
    assert model_inputs(rows, EOS)["position_ids"].shape == rows.shape


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_compute_as_if_alone(attn):
    model = llama(attn)
    a, b, c = torch.tensor([5, 6, 7, EOS]), torch.tensor([8, 9, 10, 11, EOS]), torch.tensor([12, 13, 14])
    row = torch.cat([a, b, c])[None]
    with torch.no_grad():
        masked = model(**model_inputs(row, EOS)).logits[0]
        plain = model(**model_inputs(row, None)).logits[0]
        alone = [model(input_ids=d[None]).logits[0] for d in (a, b, c)]
    expected = torch.cat(alone)
    assert torch.allclose(masked, expected, atol=1e-5)
    # without masking the later documents see the earlier ones (the first is unaffected either way)
    assert torch.allclose(plain[:4], alone[0], atol=1e-5)
    assert (plain[4:] - expected[4:]).abs().max() > 1e-2


def test_heldout_loss_with_document_masking():
    """The masked held-out loss is the cross-entropy of the standalone documents' logits."""
    model = llama()
    a, b = torch.tensor([5, 6, 7, 8, EOS]), torch.tensor([9, 10, 11, 12, 13, EOS, 20])
    row = torch.cat([a, b])[None]
    with torch.no_grad():
        logits = torch.cat([model(input_ids=a[None]).logits[0], model(input_ids=b[None]).logits[0]])
    expected = F.cross_entropy(logits[:-1], row[0, 1:], reduction="sum")
    got, count = _batch_loss_sum(model, row, EOS)
    assert count == row.size(1) - 1
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    rows = row.repeat(3, 1)
    assert heldout_loss(model, rows, 2, eos_id=EOS) == pytest.approx(expected.item() / count, rel=1e-5)
    assert heldout_loss(model, rows, 2) != pytest.approx(heldout_loss(model, rows, 2, eos_id=EOS), rel=1e-4)


@pytest.mark.slow
def test_train_with_document_masking(tiny_cpt_data, tiny_base, tmp_path):
    """`cpt train` with data.document_masking: the training forward and the held-out evaluation both mask
    (the step-0 held-out loss is the base model's masked loss), and the curve differs from an unmasked run."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.metrics import read_metrics
    from cpt.model import build_model, load_tokenizer
    from cpt.train import train

    def run(masking: bool):
        out = tmp_path / f"run_{masking}"
        cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": None, "export_at_end": False})
        cfg["stages"][0]["steps"] = 4
        cfg["data"]["document_masking"] = masking
        cfg["model"] = {"name_or_path": str(tiny_base)}  # a trained model uses its context: masking shows
        train(load_config(base=cfg), echo=lambda *a, **k: None)
        return cfg, read_metrics(out / "metrics.jsonl")

    cfg, masked = run(True)
    _, plain = run(False)
    loss = lambda recs: [r["train/loss"] for r in recs if "train/loss" in r]  # noqa: E731
    assert len(loss(masked)) == 4 and all(torch.isfinite(torch.tensor(loss(masked))))
    # rows without an EOS compute the same either way; the curves part where a row holds a document boundary
    assert loss(masked) != loss(plain)

    # step 0: the base model's held-out loss, computed here with masking
    conf = load_config(base=cfg)
    tok = load_tokenizer(conf.model)
    model = build_model(conf.model, tok)
    h = conf.data.heldout[0]
    tokens = load_heldout(HeldoutConfig(name=h.name, path=h.path, tag=h.tag), tok, conf.data.seq_len, conf.eval.tokens_per_set)
    step0 = next(r for r in masked if f"eval/{h.name}/loss" in r and r["step"] == 0)[f"eval/{h.name}/loss"]
    # same weights, same batches: equal to float noise (training evaluated through the chunked loss, ~2e-8 apart from
    # the full logits here); the unmasked loss differs by ~5e-5
    assert heldout_loss(model, tokens, conf.eval.batch_size, eos_id=tok.eos_token_id) == pytest.approx(step0, rel=1e-7)
    assert abs(heldout_loss(model, tokens, conf.eval.batch_size) - step0) > 1e-6
