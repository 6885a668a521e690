"""The seq2seq pipeline of the text tasks end to end: batches pair each source with its own target, and a model
trained through the teacher stage (on the engine) learns to use its source (a copy task).

A seq2seq model that "writes fluent target text that ignores the source" is the symptom of many pipeline bugs
(sources paired with the wrong targets, an inverted or empty encoder mask, labels shifted twice, generation
without the encoder states). These tests catch each of them: the copy task can only be learnt when the
encoder input, its mask, the label shift and the decoding loop are all right.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kd_plugins.text.generation import decode
from kd_plugins.text.models import COLLAPSED_ENCODER_SPREAD, TextStudent
from kd_tasks.text.teacher import TaskTeacherConfig, train_teacher
from kdcore.objectives import token_nll
from kdcore.signals import IGNORE_INDEX, Signal, request

LOGITS = request(Signal.LOGITS)
from kd_tasks.text.wmt import TranslationDataConfig, TranslationTask

SAMPLE = Path(__file__).parent / "data" / "ha-en-de-sample.tsv"


def _task(tmp_path: Path, cls: type[TranslationTask] = TranslationTask) -> TranslationTask:
    config = TranslationDataConfig.model_validate({"corpus": "files", "train": {"path": str(SAMPLE)},
                                                   "valid_size": 8, "test_size": 8, "vocab_size": 600})
    return cls(config, tmp_path / "cache")


def test_every_collated_row_is_a_real_pair_with_a_matching_mask(tmp_path: Path) -> None:
    task = _task(tmp_path)
    train, tokenizer = task.build_data(0).train, task.tokenizer
    pairs = {item["id"]: (item["source"], item["target"]) for item in train}
    batches = task.epoch_batches(train, 16, torch.Generator().manual_seed(3))
    assert batches
    checked = 0
    for indices in batches[:6]:
        batch = task.collate([train[i] for i in indices])
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        # The mask marks exactly the real source tokens (right padding), never nothing.
        assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != pad)
        assert bool((batch["attention_mask"].sum(dim=1) > 1).all())
        for row, item_id in enumerate(batch["ids"]):
            source_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            label_ids = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
            assert source_ids[-1] == eos and label_ids[-1] == eos
            source = tokenizer.decode(source_ids, skip_special_tokens=True)
            target = tokenizer.decode(label_ids, skip_special_tokens=True)
            # Decoding restores the text (NFKC-normalised), and source and target belong to the same pair.
            assert (source, target) == tuple(tokenizer.backend_tokenizer.normalizer.normalize_str(t)
                                             for t in pairs[item_id])
            checked += 1
    assert checked == 6 * 16


def test_decoder_inputs_are_the_labels_shifted_right_once(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import marian_config

    task = _task(tmp_path)
    tokenizer = task.tokenizer
    values = marian_config(len(tokenizer), layers=(1, 1), d_model=32, heads=2, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    values.pop("model_type")
    model = TextStudent(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values)), tokenizer)
    batch = task.collate(task.build_data(0).train[:4])
    decoder_inputs = model.decoder_inputs_from_labels(batch["labels"])
    assert bool((decoder_inputs[:, 0] == tokenizer.pad_token_id).all())  # the decoder start token
    real = batch["labels"][:, :-1] != IGNORE_INDEX
    assert torch.equal(decoder_inputs[:, 1:][real], batch["labels"][:, :-1][real])


class _CopyTask(TranslationTask):
    """The sample corpus with every target replaced by its source: learnable only by reading the source."""

    def build_data(self, seed: int) -> Any:
        splits = super().build_data(seed)
        for item in splits.train:
            item["target_ids"], item["target"] = list(item["source_ids"]), item["source"]
        return splits


def test_the_teacher_stage_learns_to_copy_its_source_and_greedy_decoding_matches_transformers(tmp_path: Path) -> None:
    task = _task(tmp_path, _CopyTask)
    short = [item for item in task.build_data(0).train if len(item["source_ids"]) <= 12]
    task.build_data(0).train[:] = short  # short sources: the copy is learnt within the step budget
    settings = {"encoder_layers": 1, "decoder_layers": 1, "d_model": 64, "heads": 2, "ffn_dim": 128, "dropout": 0.0,
                "train_steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "seed": 0}
    torch.manual_seed(0)
    hf_model, stats = train_teacher(task, settings, tmp_path / "teacher", torch.device("cpu"),
                                    TaskTeacherConfig(log_every=100))
    model = TextStudent(hf_model.eval(), task.tokenizer)

    probe = short[:48]
    batch = task.collate(probe)
    # The loss with each row's own source must be far below the loss with another row's source.
    shuffled = torch.roll(torch.arange(len(probe)), 1)
    wrong = dict(batch, input_ids=batch["input_ids"][shuffled], attention_mask=batch["attention_mask"][shuffled])
    with torch.no_grad():
        own = float(token_nll(model.forward_signals(batch, LOGITS).logits, batch["labels"]))
        other = float(token_nll(model.forward_signals(wrong, LOGITS).logits, wrong["labels"]))
    assert own < 1.5 and other > own + 3.0, (own, other, stats)
    assert stats["encoder_spread"] > COLLAPSED_ENCODER_SPREAD  # a reading encoder is far from collapsed

    generated = decode(model, batch["input_ids"], batch["attention_mask"], num_beams=1, max_new_tokens=20)
    copies = sum(ids == item["source_ids"] for ids, item in zip(generated.to_lists(), probe))
    assert copies >= 0.5 * len(probe), f"{copies}/{len(probe)} sources copied"

    # Our greedy loop is transformers' own greedy search, token for token. (At the length cap transformers forces
    # </s> from the Marian config's forced_eos_token_id; our loop stops there without it, so capped rows are compared
    # up to the cap.)
    cap = 20
    reference = hf_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=1,
                                  do_sample=False, max_new_tokens=cap)
    for ours, theirs in zip(generated.to_lists(), reference[:, 1:].tolist()):  # [:, 1:]: no decoder start token
        if len(ours) < cap:
            assert theirs[:len(ours)] == ours and set(theirs[len(ours):]) <= {task.tokenizer.pad_token_id}
        else:
            assert theirs[:cap - 1] == ours[:cap - 1]


def test_teacher_stage_precision_resolves_per_device_and_names_the_cache_key(monkeypatch: Any) -> None:
    import kdcore.precision
    from kd_tasks.text.summarization import SummarizationTask
    from kd_tasks.text.teacher import TaskTeacherConfig, effective_settings

    summarization = SummarizationTask.__new__(SummarizationTask)
    translation = TranslationTask.__new__(TranslationTask)
    cpu = torch.device("cpu")
    monkeypatch.setattr(kdcore.precision, "native_bf16", lambda device: True)
    assert effective_settings(TaskTeacherConfig(), summarization, cpu)["precision"] == "bf16"
    assert effective_settings(TaskTeacherConfig(), translation, cpu)["precision"] == "bf16"
    # fp32 teachers (an explicit fp32, or native-bf16 on a CPU without bf16 units) keep the keys they always had.
    assert "precision" not in effective_settings(TaskTeacherConfig(precision="fp32"), translation, cpu)
    monkeypatch.setattr(kdcore.precision, "native_bf16", lambda device: False)
    assert "precision" not in effective_settings(TaskTeacherConfig(), summarization, cpu)
    assert "precision" not in effective_settings(TaskTeacherConfig(), translation, cpu)
    assert effective_settings(TaskTeacherConfig(precision="bf16"), translation, cpu)["precision"] == "bf16"


def test_teacher_stage_in_bf16_autocast_trains_fp32_weights_and_differs_from_fp32(tmp_path: Path) -> None:
    task = _task(tmp_path)
    settings = {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "heads": 2, "ffn_dim": 64, "dropout": 0.0,
                "train_steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "seed": 0}
    every = TaskTeacherConfig(log_every=10)
    fp32_model, fp32_stats = train_teacher(task, settings, tmp_path / "fp32", torch.device("cpu"), every)
    bf16_model, bf16_stats = train_teacher(task, {**settings, "precision": "bf16"}, tmp_path / "bf16",
                                           torch.device("cpu"), every)
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert math.isfinite(bf16_stats["final_loss"]) and abs(bf16_stats["final_loss"] - fp32_stats["final_loss"]) < 0.5
    # Same seed and data: only the autocast differs, so different weights show it was applied.
    assert any(not torch.equal(a, b) for a, b in zip(fp32_model.parameters(), bf16_model.parameters()))


def test_the_teacher_stage_steps_like_a_plain_adamw_loop_on_the_same_batches(tmp_path: Path) -> None:
    """The engine adds bookkeeping, not math: same batches, same updates, bitwise-equal losses (dropout 0)."""
    from kdcore.batches import EpochSampler
    from kdcore.io import read_jsonl
    from kdcore.optimization import build_optimizer, build_scheduler
    from kd_tasks.text.teacher import stage_trainer_config, untrained_teacher

    task = _task(tmp_path)
    settings = {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "heads": 2, "ffn_dim": 64, "dropout": 0.0,
                "train_steps": 6, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "seed": 0}
    config = TaskTeacherConfig(log_every=1, checkpoint_every=100)
    train_teacher(task, settings, tmp_path / "teacher", torch.device("cpu"), config)
    engine = [r["loss"] for r in read_jsonl(tmp_path / "teacher.partial" / "log.jsonl") if r["type"] == "train"]

    train = task.build_data(0).train
    with torch.random.fork_rng():
        torch.manual_seed(settings["seed"])
        model = TextStudent(untrained_teacher(task, settings), task.tokenizer)
    model.train()
    trainer = stage_trainer_config(settings, config)
    optimizer = build_optimizer(model, trainer)
    scheduler = build_scheduler(optimizer, trainer)
    sampler = EpochSampler(len(train), trainer.batch_size, settings["seed"],
                           lambda generator: task.epoch_batches(train, trainer.batch_size, generator))
    plain = []
    for _ in range(settings["train_steps"]):
        batch = task.collate([train[i] for i in sampler.next_indices()])
        loss = token_nll(model.forward_signals(batch, LOGITS).logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        plain.append(float(loss.detach()))
    assert engine == plain
