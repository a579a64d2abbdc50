"""Vocabulary extension: tokenizer extension, embedding resize and initialisation, LoRA, new-row LR (cpt/vocab.py)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from functools import partial

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import tiny_llama
from cpt.demo import byte_level_bpe

from cpt.adapters import LoraConfig, apply_lora, new_row_ids
from cpt.export import save_adapter
from cpt.model import merge_adapter
from cpt.vocab import NewRowsLR, VocabConfig, build_extended_tokenizer, extend_vocabulary, learn_new_tokens

OLD = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
       "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles"] * 20
NEW = ["def forward(self, inputs):\n    return isinstance(inputs, list) and self.forward(inputs)\n",
       "import numpy as np\ndef main(self):\n    values = np.zeros(3)\n    return isinstance(values, dict)\n",
       "class Model:\n    def forward(self, x):\n        return self.layer(x) if isinstance(x, int) else x\n"] * 5


def old_tokenizer():
    return byte_level_bpe(OLD, 320)


tiny_model = partial(tiny_llama, training=False)


@pytest.fixture(scope="module")
def tok():
    return old_tokenizer()


def test_learned_tokens_are_deterministic_and_compress_the_new_corpus(tok):
    a = learn_new_tokens(tok, NEW, 30)
    b = learn_new_tokens(old_tokenizer(), list(NEW), 30)
    assert a == b and len(a) == 30
    vocab = tok.get_vocab()
    assert not any(t in vocab for t in a)
    new_tok, plan = build_extended_tokenizer(tok, VocabConfig(learn_from="unused", learn_tokens=30), texts=NEW)
    assert plan.tokens == a and plan.ids == list(range(len(tok), len(tok) + 30))
    text = NEW[0] + NEW[1]
    old_ids = tok(text)["input_ids"]
    new_ids = new_tok(text)["input_ids"]
    assert len(new_ids) < len(old_ids)
    assert new_tok.decode(new_ids) == text  # lossless
    assert max(new_ids) >= len(tok)
    # old-domain text still tokenizes to old ids only where no new merge applies: it must round-trip
    assert new_tok.decode(new_tok(OLD[0])["input_ids"]) == OLD[0]
    # the original tokenizer object is not modified
    assert len(tok) == len(old_tokenizer()) and tok(text)["input_ids"] == old_ids


@pytest.mark.parametrize("tie", [False, True])
def test_old_rows_unchanged_and_new_rows_are_mean_of_subtokens(tok, tmp_path, tie):
    f = tmp_path / "tokens.txt"
    f.write_text(" isinstance\n forward\nnumpy\n")
    model = tiny_model(len(tok), tied=tie)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    cfg = VocabConfig(add_tokens_file=str(f), learn_from="unused", learn_tokens=5, pad_to_multiple_of=8)
    model, new_tok, ids = extend_vocabulary(model, tok, cfg, texts=NEW)
    n_old = len(tok)
    assert len(new_tok) == n_old + 8 and len(ids) == 8
    emb = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] % 8 == 0 and emb.shape[0] >= len(new_tok) and model.config.vocab_size == emb.shape[0]
    assert torch.equal(emb[:n_old], old_in)
    assert torch.equal(out[:n_old], old_out)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    for t in [" isinstance", " forward", "numpy"]:
        i = new_tok.convert_tokens_to_ids(t)
        assert i >= n_old
        subs = tok(t, add_special_tokens=False)["input_ids"]
        assert len(subs) >= 2
        torch.testing.assert_close(emb[i], old_in[subs].mean(0))
        torch.testing.assert_close(out[i], old_out[subs].mean(0))
        # the file's tokens are matched in raw text
        assert i in new_tok(f"x ={t}(y)")["input_ids"]
    for i in ids:  # every new row is the mean of its token's old subtokens (learned tokens included)
        token = new_tok.convert_ids_to_tokens(i)
        subs = [x.id for x in tok.backend_tokenizer.model.tokenize(token)] if token in new_tok.backend_tokenizer.get_vocab(with_added_tokens=False) else tok(token, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(emb[i], old_in[subs].mean(0))
    # padding rows (beyond the tokenizer) are the mean of all old rows
    for r in range(len(new_tok), emb.shape[0]):
        torch.testing.assert_close(emb[r], old_in.mean(0))


def test_mean_init_fallback(tok, tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text(" isinstance\n")
    model = tiny_model(len(tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    model, new_tok, ids = extend_vocabulary(model, tok, VocabConfig(add_tokens_file=str(f), init="mean"))
    torch.testing.assert_close(model.get_input_embeddings().weight[ids[0]], old_in.mean(0))
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 1


def test_model_with_spare_rows_reuses_them_and_keeps_old_rows(tok, tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text(" isinstance\n")
    model = tiny_model(len(tok) + 16)  # padded vocabulary, as many released models have
    before = model.get_input_embeddings().weight.detach().clone()
    model, new_tok, ids = extend_vocabulary(model, tok, VocabConfig(add_tokens_file=str(f)))
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] == len(tok) + 16 and ids == [len(tok)]
    assert torch.equal(w[: len(tok)], before[: len(tok)])
    subs = tok(" isinstance", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(w[ids[0]], before[subs].mean(0))


def test_with_lora_new_rows_are_trainable_and_survive_merge(tok, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model(len(tok)).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model, new_tok, ids = extend_vocabulary(model, tok, VocabConfig(learn_from="x", learn_tokens=6,
                                                                    pad_to_multiple_of=4), texts=NEW)
    rows = new_row_ids(model, ids)
    assert rows[: len(ids)] == ids and rows[-1] == model.get_input_embeddings().weight.shape[0] - 1
    pm = apply_lora(model, LoraConfig(r=2), new_token_ids=ids)
    deltas = {n: p for n, p in pm.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2 and all(p.requires_grad and p.shape[0] == len(rows) for p in deltas.values())
    # train a few steps: only the new rows (and LoRA) move; old rows of the effective embedding do not
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.tensor([new_tok(NEW[0])["input_ids"][:40]])
    assert max(batch[0]) >= len(tok)
    emb_before = pm.get_input_embeddings()(torch.arange(len(new_tok))).detach().clone()
    pm.train()
    for _ in range(3):
        loss = pm(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    emb_after = pm.get_input_embeddings()(torch.arange(len(new_tok))).detach()
    assert torch.equal(emb_after[: len(tok)], emb_before[: len(tok)])
    assert not torch.allclose(emb_after[ids], emb_before[ids])
    with torch.no_grad():
        expected = pm(batch).logits
    adapter = save_adapter(pm, tmp_path / "adapter", tokenizer=new_tok)
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.get_input_embeddings().weight.shape[0] == len(rows) + len(tok)
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert len(PreTrainedTokenizerFast.from_pretrained(merged_dir)) == len(new_tok)


@pytest.mark.parametrize("held", ["whole", "sharded"])
def test_a_tied_base_with_embed_tokens_in_modules_to_save_merges_with_its_frozen_heads_new_rows(tok, tmp_path, held):
    """Vocabulary extension + LoRA with `modules_to_save: [embed_tokens]` on a tied base: the adapter holds the
    trained embedding copy, and the head keeps the base's weight, whose new rows the run initialised (mean of
    subtokens) and left frozen. They were stored nowhere: `cpt merge` left them at the resize's random values and the
    merged model's losses differed (silently). The adapter export records them (cpt_new_rows.safetensors).

    ``sharded``: the export under ZeRO-3 / FSDP, whose modules hold placeholders or shards (here ZeRO-3's: a
    ``[0]``-shaped weight with ``ds_id`` and ``ds_shape``) and whose gathered full state is handed to the export: the
    rows come from that state (they were skipped), and the embedding size recorded is the full one (it was 0)."""
    base_dir = tmp_path / "base"
    tiny_model(len(tok), tied=True).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model, new_tok, ids = extend_vocabulary(model, tok, VocabConfig(learn_from="x", learn_tokens=6), texts=NEW)
    pm = apply_lora(model, LoraConfig(r=2, modules_to_save=["embed_tokens"]), new_token_ids=ids)
    with torch.no_grad():  # as if trained: the LoRA B factors and the embedding copy moved
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = torch.tensor([new_tok(NEW[0])["input_ids"][:40]])
    assert max(batch[0]) >= len(tok)
    pm.eval()
    with torch.no_grad():
        expected = pm(batch).logits
    state = None
    if held == "sharded":
        state = {k: v.clone() for k, v in pm.state_dict().items()}
        for module in (pm.get_base_model().get_input_embeddings().original_module,):
            w = module.weight  # (the tied head's weight too)
            w.ds_id, w.ds_shape = 0, w.shape
            w.data = torch.empty(0)
    adapter = save_adapter(pm, tmp_path / "adapter", tokenizer=new_tok, state_dict=state)
    assert (adapter / "cpt_new_rows.safetensors").is_file()
    assert json.loads((adapter / "cpt_adapter.json").read_text())["num_embeddings"] == len(new_tok)
    merged = LlamaForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, expected, atol=1e-5, rtol=1e-5)


def _quadratic_loss(w, target):
    return ((w - target) ** 2 * torch.arange(1, w.shape[0] + 1).unsqueeze(1)).sum()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_new_rows_lr_multiplier_equals_a_separate_lr(opt_name):
    torch.manual_seed(0)
    w0 = torch.randn(10, 4)
    target = torch.randn(10, 4)
    rows, m, lr = [7, 8, 9], 0.1 if opt_name == "adamw" else 3.0, 0.05
    make = (lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)) if opt_name == "adamw" else \
        (lambda groups: torch.optim.SGD(groups, lr=lr, momentum=0.9))

    w = torch.nn.Parameter(w0.clone())
    opt = make([w])
    hook = NewRowsLR([(w, rows)], m).attach(opt)
    # reference: old rows and new rows as two tensors in two parameter groups, the second at m * lr
    a = torch.nn.Parameter(w0[:7].clone())
    b = torch.nn.Parameter(w0[7:].clone())
    ref = make([{"params": [a]}, {"params": [b], "lr": lr * m}])
    plain = torch.nn.Parameter(w0.clone())
    popt = make([plain])
    for _ in range(5):
        for o, loss in ((opt, _quadratic_loss(w, target)), (ref, _quadratic_loss(torch.cat([a, b]), target)),
                        (popt, _quadratic_loss(plain, target))):
            o.zero_grad()
            loss.backward()
            o.step()
    torch.testing.assert_close(w.detach(), torch.cat([a, b]).detach(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(w.detach()[7:], plain.detach()[7:], atol=1e-4)  # the multiplier had an effect
    torch.testing.assert_close(w.detach()[:7], plain.detach()[:7])  # other rows: untouched by the hook
    hook.detach()


def test_new_rows_lr_for_model_targets_embeddings(tok, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(" isinstance\n")
    model, new_tok, ids = extend_vocabulary(tiny_model(len(tok)), tok, VocabConfig(add_tokens_file=str(f)))
    h = NewRowsLR.for_model(model, ids, 0.5)
    assert [p is model.get_input_embeddings().weight or p is model.get_output_embeddings().weight
            for p, _ in h.targets] == [True, True]
    with pytest.raises(RuntimeError):
        h.attach(torch.optim.AdamW([model.model.layers[0].mlp.up_proj.weight]))
    # an optimizer whose parameters are swapped for flat copies after attach (as ZeRO does) is refused at step time
    from cpt.vocab import scale_new_rows_updates

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scale_new_rows_updates(model, opt, ids, 0.5)
    opt.param_groups[0]["params"] = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match="no longer updates"):
        opt.step()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_new_rows_lr_is_refused_before_sharding(kind, tok, tmp_path):
    """Under FSDP and ZeRO the optimizer updates flat shards: refused when the optimizer is built (one line from
    `cpt train`, nothing written), not at the first step."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cpt.config import ConfigError
    from cpt.vocab import scale_new_rows_updates

    f = tmp_path / "t.txt"
    f.write_text(" isinstance\n")
    model, _, ids = extend_vocabulary(tiny_model(len(tok)), tok, VocabConfig(add_tokens_file=str(f)))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="new_rows_lr_multiplier needs one device or DDP"):
        scale_new_rows_updates(model, opt, ids, 2.0, SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    scale_new_rows_updates(model, opt, ids, 2.0, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP


def test_config_validation():
    with pytest.raises(ValueError):
        VocabConfig()
    with pytest.raises(ValueError):
        VocabConfig(learn_from="x")
    with pytest.raises(ValueError):
        VocabConfig(add_tokens_file="x", learn_tokens=3)


def test_shards_prepared_with_the_extended_tokenizer(tok, tmp_path):
    """Prepare and train build the same extended tokenizer from the same corpus file; the shards carry new ids."""
    import json as _json

    from cpt.data.loader import load_heldout
    from cpt.data.prepare import prepare
    from cpt.data.shards import ShardError, TokenShards, tokenizer_fingerprint
    from cpt.data.sources import HeldoutConfig

    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(_json.dumps({"text": t}) + "\n" for t in NEW))
    cfg = VocabConfig(learn_from=str(corpus), learn_tokens=20)
    ext1, plan1 = build_extended_tokenizer(tok, cfg)
    ext2, plan2 = build_extended_tokenizer(old_tokenizer(), cfg)
    assert plan1.tokens == plan2.tokens and len(plan1.tokens) == 20
    assert tokenizer_fingerprint(ext1) == tokenizer_fingerprint(ext2) != tokenizer_fingerprint(tok)
    ext1.save_pretrained(tmp_path / "tok")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(ext1)
    prepare(str(corpus), reloaded, str(tmp_path / "shards"))
    shards = TokenShards.open(str(tmp_path / "shards"))
    assert int(shards.read(0, shards.num_tokens).max()) >= len(tok)
    h = HeldoutConfig(name="py", path=str(tmp_path / "shards"), tag="downstream")
    assert load_heldout(h, ext2, 8).shape[1] == 8
    with pytest.raises(ShardError):
        load_heldout(h, tok, 8)  # the old tokenizer does not match these shards
    prepare(str(corpus), tok, str(tmp_path / "old_shards"))  # the other way round: a model.vocab run, old shards
    old = HeldoutConfig(name="py", path=str(tmp_path / "old_shards"), tag="downstream")
    with pytest.raises(ShardError, match=r"tokenizer '.* extended by model.vocab' has vocabulary hash .*--extend-vocab"):
        load_heldout(old, ext2, 8)  # says why the hash is not the base tokenizer's and how to prepare with it


@pytest.mark.parametrize("tie", [False, True])
def test_init_from_an_extended_export_keeps_its_trained_new_rows(tok, tmp_path, tie):
    """train.init_from an HF export of an extended run, with the same model.vocab: the export's trained new rows are
    kept (they were reset to their mean-of-subtokens initial values, silently); without the export's tokenizer
    (weights_from=None) they are initialised as before."""
    import json

    from cpt.config import ModelConfig
    from cpt.model import prepare_model

    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in NEW))
    (tmp_path / "tokens.txt").write_text(" isinstance\n")
    vcfg = VocabConfig(add_tokens_file=str(tmp_path / "tokens.txt"), learn_from=str(tmp_path / "new.jsonl"), learn_tokens=5)
    mcfg = ModelConfig(name_or_path="unused", vocab=vcfg)
    said = []
    model, new_tok, ids = prepare_model(mcfg, tiny_model(len(tok), tied=tie), tok, log_fn=said.append)
    assert f"model.vocab: {len(ids)} tokens added to the tokenizer ({len(new_tok):,} in all)" in said, said
    with torch.no_grad():  # "training" moves the new rows
        for w in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            w[ids] += 1.0
    model.save_pretrained(tmp_path / "export")
    new_tok.save_pretrained(tmp_path / "export")
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}

    said = []
    again, _, ids2 = prepare_model(mcfg, LlamaForCausalLM.from_pretrained(tmp_path / "export"), tok, log_fn=said.append,
                                   weights_from=str(tmp_path / "export"))
    assert ids2 == ids and any(f"{len(ids)} of the {len(ids)} new tokens keep the rows" in s for s in said)
    for n, p in again.state_dict().items():
        assert torch.equal(p, trained[n]), n
    reset, _, _ = prepare_model(mcfg, LlamaForCausalLM.from_pretrained(tmp_path / "export"), tok, log_fn=lambda *a: None)
    assert not torch.equal(reset.get_input_embeddings().weight[ids], trained["model.embed_tokens.weight"][ids])


@pytest.mark.parametrize("tie", [False, True])
def test_name_or_path_an_extended_export_with_the_same_vocab_adds_nothing(tok, tmp_path, tie):
    """model.name_or_path an HF export of an extended run, with the same model.vocab: its tokenizer already holds
    the learned and listed tokens (learning went on and added 5 more, silently); nothing is added, their trained rows
    are kept, a log line says so, and `cpt prepare --extend-vocab` builds the same tokenizer. Another model.vocab
    (more tokens) still extends it."""
    import json

    from transformers import AutoTokenizer

    from cpt.config import ModelConfig
    from cpt.data.shards import tokenizer_fingerprint
    from cpt.model import prepare_model

    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in NEW))
    (tmp_path / "tokens.txt").write_text(" isinstance\n")
    vcfg = VocabConfig(add_tokens_file=str(tmp_path / "tokens.txt"), learn_from=str(tmp_path / "new.jsonl"), learn_tokens=5)
    model, new_tok, ids = prepare_model(ModelConfig(name_or_path="unused", vocab=vcfg), tiny_model(len(tok), tied=tie),
                                        tok, log_fn=lambda *a: None)
    assert len(ids) == 6
    with torch.no_grad():  # "training" moves the new rows
        for w in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            w[ids] += 1.0
    export = tmp_path / "export"
    model.save_pretrained(export)
    new_tok.save_pretrained(export)
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}

    said = []
    again, tok2, ids2 = prepare_model(ModelConfig(name_or_path=str(export), vocab=vcfg),
                                      LlamaForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export),
                                      log_fn=said.append)
    assert len(tok2) == len(new_tok) and tokenizer_fingerprint(tok2) == tokenizer_fingerprint(new_tok)
    assert sorted(ids2) == sorted(ids)  # still the run's new tokens (LoRA, new_rows_lr_multiplier)
    assert any("6 of its 6 tokens are already in the tokenizer" in s for s in said), said
    assert any("6 of the 6 new tokens keep the rows" in s for s in said), said
    for n, p in again.state_dict().items():
        assert torch.equal(p, trained[n]), n
    same, _ = build_extended_tokenizer(AutoTokenizer.from_pretrained(export), vcfg)  # cpt prepare --extend-vocab
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(new_tok)
    more, plan = build_extended_tokenizer(AutoTokenizer.from_pretrained(export), vcfg.model_copy(update={"learn_tokens": 8}))
    assert len(more) > len(new_tok) and plan.present == 1  # (" isinstance" from the file; the learned ones are new)


def test_a_stale_learned_record_learns_again(tok, caplog):
    """A tokenizer whose cpt_vocab record lists learned tokens it does not hold (an edited tokenizer, or an export's
    tokenizer_config.json over another tokenizer): the record matched, so nothing was learned and the missing tokens
    were silently dropped from the extension. Now they are learned again, with a warning."""
    import copy
    import logging

    from cpt.vocab import RECORD, _learn_key

    vcfg = VocabConfig(learn_from="unused", learn_tokens=5)
    fresh, plan = build_extended_tokenizer(tok, vcfg, texts=NEW)
    stale = copy.deepcopy(tok)
    stale.init_kwargs[RECORD] = {"learned": {_learn_key(list(NEW), 5): plan.tokens}, "added": []}
    with caplog.at_level(logging.WARNING, logger="cpt.vocab"):
        again, plan2 = build_extended_tokenizer(stale, vcfg, texts=NEW)
    assert plan2.tokens == plan.tokens and len(again) == len(fresh) and plan2.present == 0
    assert "record lists learned tokens it does not hold" in caplog.text
    assert again.init_kwargs[RECORD]["learned"] == fresh.init_kwargs[RECORD]["learned"]
