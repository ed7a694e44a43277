"""Hugging Face export and import: exact parity with stock transformers, tokenizers, round trips,
`train.init_from`, `train.trainable`, and the refusals for bad input (nothing half-written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SMALL, run_cli

from tinylm.config import (
    Config,
    ConfigError,
    ModelConfig,
    list_presets,
    load_config,
    load_config_file,
)
from tinylm.export.writer import export_hf
from tinylm.generate import generate
from tinylm.hf.model import hf_family
from tinylm.model import GPT
from tinylm.tokenizer import CharTokenizer
from tinylm.tokenizer.base import EOT
from tinylm.train.checkpoint import CheckpointError, save_checkpoint
from tinylm.train.init_from import apply_init_from, open_source

transformers = pytest.importorskip("transformers")  # in the dev and hf extras

TEXT = "Hello, world! naïve café 日本語 emoji 👍🏽🤖 \n\n   spaces\t\ttabs\ndef f(x):\n    return x**2\n"
VARIED = (
    "It's a test; we'll see.  naïve café — “quotes” ½ € 日本語 한국어 русский\n"
    "emoji 👍🏽👨‍👩‍👧 🚀 flags 🇫🇷   runs of    spaces\n\n\n\t\ttabs \r\n"
    "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}  # code\n"
    f"doc one{EOT}doc two{EOT}{EOT} <|unk|> literal, unseen chars: ∮ ℵ 🦄 \x00"
)

# One small config per exportable family: (name, ModelConfig fields, expected HF model_type).
FAMILIES = {
    "gpt2": dict(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True),
    "gpt2-nobias-untied": dict(
        norm="layernorm", pos_emb="learned", mlp="gelu", bias=False, tie_embeddings=False
    ),
    "llama-gqa-untied": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False
    ),
    "llama-bias-tied": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=True, rope_theta=500.0
    ),
    "qwen3": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, qk_norm=True, n_kv_head=2
    ),
    "mistral": dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, sliding_window=12),
}
MODEL_TYPES = {
    "gpt2": "gpt2",
    "gpt2-nobias-untied": "gpt2",
    "llama-gqa-untied": "llama",
    "llama-bias-tied": "llama",
    "qwen3": "qwen3",
    "mistral": "mistral",
}


def char_tok() -> CharTokenizer:
    return CharTokenizer.fit([TEXT])


def random_model(tok, seed: int = 0, **fields) -> GPT:
    """A small model with weights far from init (so parity is tested on large logits)."""
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=64,
        n_layer=2,
        n_head=4,
        d_model=32,
        norm_eps=1e-5,
        **fields,
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


def fake_run(tmp_path: Path, model: GPT, tok, name: str = "run") -> Path:
    """A run directory with one checkpoint of `model` (what `tinylm train` leaves behind)."""
    run = tmp_path / name
    cfg = Config(model=model.cfg, run_name=name)
    save_checkpoint(
        run / "checkpoints",
        10,
        model_state=model.state_dict(),
        train_state={"loop": {}},
        config=cfg,
        tokenizer=tok,
        val_loss=1.5,
    )
    return run


def hf_load(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exported_model_matches_tinylm(tmp_path, name):
    tok = char_tok()
    model = random_model(tok, **FAMILIES[name])
    out = export_hf(fake_run(tmp_path, model, tok), tmp_path / "hf").out
    hf = hf_load(out)
    assert hf.config.model_type == MODEL_TYPES[name]
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    idx = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape  # padded vocabulary rows dropped: same vocabulary
    assert ours.abs().max() > 1.0  # the comparison is over substantial logits
    assert (ours - theirs).abs().max().item() < 1e-4

    # Greedy decoding of 50 tokens (end-of-text not treated as a stop by either side).
    prompt = tok.encode("Hello, wor")
    mine = generate(model, prompt, max_new_tokens=50, temperature=0.0)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False)
    assert len(mine) == 50 and ids[0, len(prompt) :].tolist() == mine


def test_tokenizers_encode_exactly_like_tinylm(tmp_path, shared_data):
    from tinylm.hf.tokenizer import tokenizer_from_hf_dir, write_tokenizer_files
    from tinylm.tokenizer.bpe import from_gpt2_files
    from tinylm.tokenizer.bpe_train import train_bpe

    bpe = train_bpe(
        texts=[(shared_data / "tinyshakespeare.txt").read_text()[:100_000], VARIED],
        vocab_size=600,
        special_tokens=[EOT],
        num_workers=1,
    ).tokenizer()
    gpt2 = from_gpt2_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt")
    toks = {
        "char": char_tok(),
        "char-skip": CharTokenizer(char_tok().chars, "skip"),
        "bpe": bpe,
        "gpt2": gpt2,
    }
    for name, tok in toks.items():
        out = tmp_path / name
        out.mkdir()
        write_tokenizer_files(tok, out, 64)
        hf = transformers.AutoTokenizer.from_pretrained(out)
        for text in (VARIED, TEXT, VARIED * 3):
            assert hf(text)["input_ids"] == tok.encode(text), name
        assert hf.eos_token == hf.bos_token == hf.pad_token == EOT
        assert hf.eos_token_id == tok.eot_id
        back = tokenizer_from_hf_dir(out)
        assert back.encode(VARIED) == tok.encode(VARIED), name
    # the char form maps unseen characters to <|unk|> (or drops them), as tinylm does
    assert toks["char"].special_tokens["<|unk|>"] in toks["char"].encode(VARIED)
    assert len(toks["char-skip"].encode(VARIED)) < len(toks["char"].encode(VARIED))


def test_every_preset_exports():
    for preset in list_presets():
        assert hf_family(load_config(preset).model) in ("gpt2", "llama", "qwen3", "mistral")


def test_non_exact_architecture_is_refused_listing_the_features(tmp_path):
    tok = char_tok()
    model = random_model(tok, norm="rmsnorm", pos_emb="rope", mlp="gelu")
    run = fake_run(tmp_path, model, tok)
    with pytest.raises(ConfigError, match=r"model\.mlp=gelu \(it needs swiglu\)"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert run_cli("export", run, "--out", tmp_path / "hf") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left


def test_export_refusals_and_force(tmp_path, capsys):
    tok = char_tok()
    model = random_model(tok, **FAMILIES["llama-gqa-untied"])
    empty_run = tmp_path / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    assert run_cli("export", empty_run, "--out", tmp_path / "a") == 2
    assert "no intact checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    run = fake_run(tmp_path, model, tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("export", run, "--out", out) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == [
        "notes.txt"
    ]
    assert run_cli("export", run, "--out", out, "--force", "--dtype", "bf16") == 0
    assert (out / "notes.txt").read_text() == "mine"  # never delete what we did not write
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "1.5000" not in card  # no eval record: not invented
    hf = hf_load(out)
    assert hf.dtype == torch.bfloat16

    # a checkpoint whose weights were damaged after it was written is refused
    ckpt = next((run / "checkpoints").iterdir())
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[100:110] = b"\xff" * 10
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged|no intact"):
        export_hf(ckpt, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def _hf_random_dir(tmp_path: Path, family: str) -> tuple[Path, object]:
    """save_pretrained of a random-init stock HF model with a tinylm char tokenizer beside it."""
    from tinylm.hf.tokenizer import write_tokenizer_files

    tok = char_tok()
    common = dict(vocab_size=tok.vocab_size + 5, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        initializer_range=0.2,
    )
    cfg = {
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2, **common
        ),
        "llama": lambda: transformers.LlamaConfig(
            tie_word_embeddings=False, **llama_like, **common
        ),
        "qwen3": lambda: transformers.Qwen3Config(
            head_dim=8, tie_word_embeddings=True, **llama_like, **common
        ),
        "mistral": lambda: transformers.MistralConfig(sliding_window=10, **llama_like, **common),
    }[family]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a dropped gain would show
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path / f"hf-{family}"
    hf.save_pretrained(path)
    write_tokenizer_files(tok, path, 64)
    return path, hf


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "mistral"])
def test_hf_model_imports_with_identical_logits(tmp_path, family):
    path, hf = _hf_random_dir(tmp_path, family)
    cfg = Config()
    cfg.train.init_from = str(path)
    source = apply_init_from(cfg)
    model = GPT(cfg.model)
    model.load_state_dict(source.model_state)
    model.eval()
    idx = torch.randint(0, 40, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    assert source.tokenizer.encode(TEXT) == char_tok().encode(TEXT)


def test_bad_hf_directories_are_clear_errors(tmp_path, monkeypatch):
    path, _ = _hf_random_dir(tmp_path, "llama")
    cfg = Config()
    cfg.train.init_from = str(path)
    # unsupported family
    hf_cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported"):
        apply_init_from(cfg)
    # corrupt weights
    (path / "config.json").write_text(json.dumps(hf_cfg))
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        apply_init_from(cfg)
    # hf:NAME without network: one clear line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cfg.train.init_from = "hf:gpt2"
    with pytest.raises(ConfigError, match=r"could not get 'gpt2'.*hf download gpt2"):
        apply_init_from(cfg)


def test_round_trip_train_export_init_from_trainable(tmp_path, corpus, capsys):
    """Train -> export -> init_from (identical logits) -> fine-tune the last block only."""
    common = [*SMALL, f"data.train={corpus}", f"out_dir={tmp_path}", "checkpoint.interval=0"]
    arch = ["model.norm=rmsnorm", "model.pos_emb=rope", "model.mlp=swiglu", "model.n_kv_head=1"]
    assert run_cli("train", "tiny", *common, *arch, "train.max_steps=3", "run_name=a") == 0
    assert run_cli("export", tmp_path / "a", "--out", tmp_path / "a-hf") == 0
    from tinylm.train.checkpoint import load_model

    model, _, tok, _ = load_model(tmp_path / "a")

    # import the export: the same function
    cfg = load_config("tiny", [*SMALL, f"train.init_from={tmp_path / 'a-hf'}"])
    source = apply_init_from(cfg)
    assert source.tokenizer.encode(VARIED) == tok.encode(VARIED)
    back = GPT(cfg.model)
    back.load_state_dict(source.model_state)
    idx = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back.eval()(idx)[0] - model(idx)[0]).abs().max().item() < 1e-5
    # contradicting overrides and tokenizers are refused, naming the key
    with pytest.raises(ConfigError, match=r"model\.d_model=64 contradicts"):
        over = ["model.d_model=64", f"train.init_from={tmp_path / 'a'}"]
        apply_init_from(load_config("tiny", over), over)
    bad = ["model.d_model=64", f"train.init_from={tmp_path / 'a'}"]
    assert run_cli("train", "tiny", *common, *bad, "run_name=x") == 2
    assert "model.d_model=64 contradicts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"data\.tokenizer=bpe:300 is not the tokenizer"):
        apply_init_from(
            load_config("tiny", ["data.tokenizer=bpe:300", f"train.init_from={tmp_path / 'a'}"]),
            ["data.tokenizer=bpe:300"],
        )

    # continue from run a (preset model settings differ: the source's architecture wins),
    # training only the last block
    init = [f"train.init_from={tmp_path / 'a'}", "train.trainable=last:1", "optim.warmup_steps=0"]
    assert run_cli("train", "tiny", *common, *init, "train.max_steps=2", "run_name=b") == 0
    before = load_model(tmp_path / "a")[0].state_dict()
    after = load_model(tmp_path / "b")[0].state_dict()
    assert load_config_file(tmp_path / "b" / "config.yaml").model == model.cfg
    for key, value in after.items():
        changed = not torch.equal(value, before[key])
        assert changed == (key.startswith("blocks.1.") or key == "norm_f.weight"), key
    assert f"init_from: {tmp_path / 'a'}" in (tmp_path / "b" / "config.yaml").read_text()


def test_trainable_specs(tmp_path):
    from tinylm.train.trainable import apply_trainable

    tok = char_tok()
    model = random_model(tok, **FAMILIES["gpt2"])
    n_train, n_total = apply_trainable(model, "no-embeddings")
    frozen = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    assert n_total - n_train == frozen and not model.lm_head.weight.requires_grad  # tied
    n_train, _ = apply_trainable(model, "all")
    assert n_train == n_total
    with pytest.raises(ConfigError, match=r"last:1\.\.last:2"):
        apply_trainable(model, "last:3")
    with pytest.raises(ConfigError, match=r"train\.trainable"):
        load_config("tiny", ["train.trainable=first:2"])


def test_open_source_refuses_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        open_source(str(tmp_path / "nope"))
