"""LoRA and frozen-part students (student.args.lora / student.args.freeze): built through the real factories on tiny
GPT-2 / Llama / Marian models; only the trainable part is saved and a state loads only onto the same frozen base."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kd_plugins.text.generation import generate
from kd_plugins.text.lora import BASE_FINGERPRINT_KEY, merged_copy
from kd_plugins.text.models import (
    CausalLMStudentFactory, CausalLMTeacherFactory, Seq2SeqStudentFactory, TextModelConfig, TextStudent, marian_config,
)
from kdcore.checkpoint import load_weights, save_weights
from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.signals import Signal, request

pytest.importorskip("peft")
LOGITS = request(Signal.LOGITS)
GPT2 = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
LLAMA = {"model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 2,
         "eos_token_id": 1, "pad_token_id": 0}


def _context(tmp_path: Path, seed: int = 0, student: bool = True) -> BuildContext:
    return BuildContext(task=SimpleNamespace(tokenizer=None), cache_dir=tmp_path, device=torch.device("cpu"),  # type: ignore[arg-type]
                        seed=seed, teacher=object() if student else None)  # type: ignore[arg-type]


def _causal(tmp_path: Path, seed: int = 0, config: dict[str, Any] = GPT2, **args: Any) -> TextStudent:
    built = CausalLMStudentFactory().build(TextModelConfig(config=config, **args), _context(tmp_path, seed))
    assert isinstance(built, TextStudent)
    return built


def _train(student: TextStudent, batch: dict[str, Any], steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    student.train()
    for _ in range(steps):
        logits = student.forward_signals(batch, LOGITS).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), student.target_labels(batch).flatten(),
                                                 ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_only_the_adapters_train_and_every_call_reaches_them(tiny: SimpleNamespace, tmp_path: Path,
                                                             config: dict[str, Any]) -> None:
    student = _causal(tmp_path, config=config, lora={"r": 4, "alpha": 8})
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert student.num_parameters(trainable_only=True) < 0.1 * student.num_parameters()
    batch = tiny.causal_batch(4)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    base_logits = student.forward_signals(batch, LOGITS).logits.detach()  # lora_B starts at 0: the base model
    _train(student, batch)
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable and any(".lora_B." in name for name in changed)
    # kd's path (base_model + its own LM head call) and the full transformers forward both see the adapters.
    with torch.no_grad():
        logits = student.forward_signals(batch, LOGITS).logits
        full = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # The merged copy leaves the student untouched and computes the same logits.
        merged = merged_copy(student)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base_logits)
    assert any(".lora_A." in name for name, _ in student.hf_model.named_parameters())  # not unloaded by the merge
    # Greedy generation (kd's decoder) runs through the adapted model: its first token is the logits' argmax.
    prompt = batch["input_ids"][:1, :2]
    out = generate(student, prompt, torch.ones_like(prompt), max_new_tokens=3).sequences
    with torch.no_grad():
        first = student.hf_model(input_ids=prompt).logits[0, -1].argmax()
    assert int(out[0, 0]) == int(first)


def test_the_state_holds_adapters_and_loads_only_onto_the_same_base(tiny: SimpleNamespace, tmp_path: Path) -> None:
    student = _causal(tmp_path, seed=3, lora={"r": 4})
    batch = tiny.causal_batch(4)
    _train(student, batch)
    state = student.state_dict()
    adapters = {name for name, p in student.named_parameters() if p.requires_grad}
    assert set(state) == adapters | {BASE_FINGERPRINT_KEY}
    lora_file, full_file = tmp_path / "lora.safetensors", tmp_path / "full.safetensors"
    save_weights(student, lora_file)
    plain = _causal(tmp_path, seed=3)
    save_weights(plain, full_file)
    assert lora_file.stat().st_size < 0.1 * full_file.stat().st_size

    again = _causal(tmp_path, seed=3, lora={"r": 4}).eval()  # the same config and seed rebuild the same base
    load_weights(again, lora_file)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_signals(batch, LOGITS).logits,
                                   student.forward_signals(batch, LOGITS).logits, rtol=0, atol=0)
    other_base = _causal(tmp_path, seed=4, lora={"r": 4})
    with pytest.raises(KDUserError, match="other frozen weights"):
        load_weights(other_base, lora_file)
    with pytest.raises(KDUserError, match="no fingerprint"):
        other_base.load_state_dict({k: v for k, v in state.items() if k != BASE_FINGERPRINT_KEY})
    with pytest.raises(RuntimeError, match="Missing key"):  # an adapter missing is still an error
        again.load_state_dict({k: v for k, v in state.items() if ".lora_B." not in k})


def test_seq2seq_student_defaults_to_all_linear_layers(tiny: SimpleNamespace, tmp_path: Path) -> None:
    config = TextModelConfig(config=marian_config(tiny.VOCAB, layers=(1, 1), d_model=32, heads=2, pad_token_id=tiny.PAD,
                                                  eos_token_id=tiny.EOS, decoder_start_token_id=tiny.PAD),
                             lora={"r": 2})
    student = Seq2SeqStudentFactory().build(config, _context(tmp_path))
    adapted = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in student.named_parameters()
               if ".lora_A." in name}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= adapted and "lm_head" not in adapted
    batch = tiny.batch(3)
    _train(student, batch, steps=2)
    with torch.no_grad():
        ours = student.forward_signals(batch, LOGITS).logits
        full = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                decoder_input_ids=student.decoder_inputs_from_labels(batch["labels"])).logits
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


def test_bad_lora_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KDUserError, match=r"student.args.lora.target_modules = \['nothing_here'\].*c_attn"):
        _causal(tmp_path, lora={"r": 4, "target_modules": ["nothing_here"]})
    with pytest.raises(KDUserError, match="teacher.args.lora"):
        CausalLMTeacherFactory().build(TextModelConfig(config=GPT2, lora={"r": 4}), _context(tmp_path, student=False))
    with pytest.raises(ValueError, match="extra"):
        TextModelConfig(config=GPT2, lora={"rank": 4})
    with pytest.raises(KDUserError, match="both given"):
        _causal(tmp_path, lora={"r": 4}, freeze=["transformer.wte.*"])


def test_freeze_trains_and_saves_only_the_rest(tiny: SimpleNamespace, tmp_path: Path) -> None:
    student = _causal(tmp_path, freeze=["transformer.h.0.*", "transformer.wte.*"])
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("hf_model.transformer.h.0.", "hf_model.transformer.wte.")) for n in frozen)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    _train(student, tiny.causal_batch(4))
    assert all(torch.equal(p, before[name]) for name, p in student.named_parameters() if name in frozen)
    state = student.state_dict()
    assert not frozen & set(state) and BASE_FINGERPRINT_KEY in state
    again = _causal(tmp_path, freeze=["transformer.h.0.*", "transformer.wte.*"])
    again.load_state_dict(state)
    assert all(torch.equal(p, dict(student.named_parameters())[n]) for n, p in again.named_parameters())
    with pytest.raises(KDUserError, match="'encoder.*' matches no parameter"):
        _causal(tmp_path, freeze=["encoder.*"])
    with pytest.raises(KDUserError, match="freezes every parameter"):
        _causal(tmp_path, freeze=["*"])


SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
# The tiny wmt preset (12 steps, checkpoints at 6 and 12) on the committed sample, a LoRA student with dropout (the
# random stream must be restored on resume).
LORA_RUN = ["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", "--seed", "5",
            "--set", "data.corpus=files", "--set", f"data.train.path={SAMPLE}", "--set", "data.valid_size=16",
            "--set", "data.test_size=24", "--set", "student.args.lora.r=4", "--set", "student.args.lora.dropout=0.1"]


@pytest.mark.slow
def test_lora_run_resumes_after_sigkill_saves_adapters_only_and_exports(tmp_path: Path, fault_env: dict[str, str],
                                                                         run_kd: Any) -> None:
    import json

    from safetensors import safe_open
    from transformers import AutoModelForSeq2SeqLM

    from kdcore.io import read_jsonl

    env = {**fault_env, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run_kd(*LORA_RUN, "--out", str(straight), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_kd(*LORA_RUN, "--out", str(killed), cwd=tmp_path, env={**env, "KD_KILL_AT_STEP": "9"})
    assert result.returncode == -9, result.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000006"]
    result = run_kd("run", "--out", str(killed), "--resume", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    quality = {k: v for k, v in expected["student"].items() if "second" not in k}  # speeds vary
    assert quality == {k: v for k, v in actual["student"].items() if "second" not in k}
    assert actual["best_step"] == expected["best_step"]
    assert [(r["type"], r["step"], r.get("loss")) for r in read_jsonl(killed / "log.jsonl")] == \
           [(r["type"], r["step"], r.get("loss")) for r in read_jsonl(straight / "log.jsonl")]
    final = [d / "checkpoints" / "step-00000012" / "student.safetensors" for d in (straight, killed)]
    assert final[0].read_bytes() == final[1].read_bytes()  # the same adapters, bit for bit

    # Checkpoints and best/ hold the adapters (and the base's fingerprint) only: a fraction of the full weights.
    with safe_open(str(final[0]), framework="pt") as handle:
        keys = list(handle.keys())
    assert BASE_FINGERPRINT_KEY in keys and all(".lora_" in k for k in keys if k != BASE_FINGERPRINT_KEY)
    assert final[0].stat().st_size < 0.35 * 4 * expected["params"]["student"]
    assert (straight / "best" / "student.safetensors").stat().st_size == final[0].stat().st_size

    # kd export merges by default, or writes a peft adapter directory; both compute the LoRA student's logits.
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapters"
    for out, extra in ((merged_dir, []), (adapter_dir, ["--format", "peft"])):
        result = run_kd("export", "--run", str(straight), "--out", str(out), *extra, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    merged_checks = json.loads((merged_dir / "export.json").read_text())["self_test"]
    assert merged_checks["merged_logits_max_abs_difference"] <= 1e-4
    assert merged_checks["greedy_outputs_equal_kd"] == "16/16"
    assert not any("lora" in k for k in safe_open(str(merged_dir / "model.safetensors"), framework="pt").keys())
    assert json.loads((adapter_dir / "export.json").read_text())["self_test"]["logits_max_abs_difference"] <= 1e-4
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= {p.name for p in adapter_dir.iterdir()}
    from peft import PeftModel

    merged = AutoModelForSeq2SeqLM.from_pretrained(str(merged_dir)).eval()
    adapted = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(adapter_dir / "base")),
                                        str(adapter_dir)).eval()
    ids = torch.tensor([[5, 9, 14, 27, 2]])
    with torch.no_grad():
        one = merged(input_ids=ids, decoder_input_ids=ids).logits
        two = adapted(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)


def test_the_peft_format_is_for_lora_students_only(tmp_path: Path) -> None:
    from kd_plugins.text.export import TextStudentExporter

    plain = TextStudentExporter(SimpleNamespace(student=_causal(tmp_path)), None)  # type: ignore[arg-type]
    assert "student.args.lora" in (plain.refusal("peft") or "") and plain.refusal("hf") is None
    lora = TextStudentExporter(SimpleNamespace(student=_causal(tmp_path, lora={"r": 2})), None)  # type: ignore[arg-type]
    assert lora.refusal("peft") is None and next(iter(lora.formats)) == "hf"  # merging stays the default
