"""DistilHuBERT's `paper` preset against the reference code, s3prl's ``DistillerModel`` (s3prl 0.4.18).

s3prl is a test-only dependency, installed without its dependencies by ``make test``
(``pip install --no-deps s3prl==0.4.18``); its distiller model needs nothing but torch and numpy. The s3prl model is
built from s3prl's ``pretrain/distiller/config_model.yaml`` with the paper's three target layers, kd's student from
the preset; s3prl's weights are copied into kd's student, and both must then compute the same hidden states,
predictions, loss and gradients. s3prl's pip package does not ship ``pretrain/distiller``, so its loss
(``DistillerForPretrain.compute_loss``) and recipe (``config_runner.yaml``) are transcribed below from the
repository at the 0.4.18 tag.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

try:
    from s3prl.optimizers import WarmupLinearSchedule
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel
except ImportError as error:  # a missing reference must fail the suite, not skip it
    pytest.fail(f"the s3prl parity tests need s3prl: pip install --no-deps s3prl==0.4.18 (make test does); {error}",
                pytrace=False)

from kd_plugins.speech.distilhubert import DistilHubertMethod, DistilHubertStudent, DistilHubertStudentConfig
from kd_plugins.speech.distilhubert import DistilHubertStudentFactory
from kd_plugins.speech.waveforms import conv_output_lengths
from kdcore.config import TrainerConfig
from kdcore.interfaces import BuildContext
from kdcore.objectives.layers import HIDDEN_LAYER_IDS, DistilHubertObjective
from kdcore.optimization import build_optimizer, lr_factor
from kdcore.signals import SignalRequest, Signals

#: s3prl's pretrain/distiller/config_model.yaml (0.4.18), with the paper's three target layers (the yaml: [4, 12]).
S3PRL_MODEL_CONFIG: dict[str, Any] = {
    "extractor_mode": "default", "extractor_conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "extractor_dropout": 0.0, "feature_grad_mult": 0.1, "conv_pos": 128, "conv_pos_groups": 16,
    "encoder_layers": 2, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "activation_fn": "gelu", "layer_norm_first": False, "attention_type": "original",
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "encoder_layerdrop": 0.0,
    "final_dim": 768, "out_layer_type": "expand-last", "n_tasks": 3, "task_emb_type": "expand-last",
    "loss_type": "l1", "feat_pen_loss": 0.0, "cosine_loss": 1.0, "pred_layer_id": [4, 8, 12],
    "init_teacher_conv_layers": True, "init_teacher_encoder_layers": True,
}
#: s3prl's pretrain/distiller/config_runner.yaml (0.4.18): runner and optimizer.
S3PRL_RUNNER = {"total_steps": 200000, "gradient_clipping": 5.0, "train_batch_size": 24}
S3PRL_OPTIMIZER = {"lr": 2.0e-4, "warmup_proportion": 0.07, "betas": (0.9, 0.98), "eps": 1.0e-6}
#: optimizers.get_grouped_parameters: what AdamW_with_schedule applies (its groups override the yaml's 1e-6).
S3PRL_WEIGHT_DECAY = 0.01
PAPER_PARAMETERS = 23_491_200  # s3prl's DistillerModel without output_layer
HEAD_PARAMETERS = 768 * 2304 + 2304 + 3 * (768 * 768 + 768)


def s3prl_loss(pred: torch.Tensor, target: torch.Tensor, cosine_loss: float) -> torch.Tensor:
    """``DistillerForPretrain.compute_loss`` (pretrain/distiller/pretrain_expert.py) with l1 and feat_pen_loss 0:
    ``pred``/``target`` ``(B, N, T, D)``, means over everything (heads, frames and padding included)."""
    rec_loss = F.l1_loss(pred, target, reduction="none").mean()
    sim_loss = -F.logsigmoid(F.cosine_similarity(pred, target, dim=-1)).mean()
    return rec_loss + sim_loss * cosine_loss


def paper_student_config() -> DistilHubertStudentConfig:
    preset = DistilHubertMethod.presets["paper"]
    assert preset["student"]["name"] == DistilHubertStudentFactory.name
    return DistilHubertStudentConfig.model_validate(preset["student"]["args"])


def copy_s3prl_into_kd(reference: DistillerModel, student: DistilHubertStudent) -> None:
    """s3prl's weights into kd's student, parameter by parameter (every kd parameter is written exactly once)."""
    source = dict(reference.named_parameters())
    written: set[str] = set()
    target = dict(student.named_parameters())

    def put(name: str, value: torch.Tensor) -> None:
        assert name in target and name not in written, name
        assert target[name].shape == value.shape, (name, target[name].shape, value.shape)
        with torch.no_grad():
            target[name].copy_(value)
        written.add(name)

    for index in range(len(reference.conv_layers)):
        put(f"front_end.feature_extractor.conv_layers.{index}.conv.weight",
            source[f"feature_extractor.conv_layers.{index}.0.weight"])
    for part in ("weight", "bias"):
        put(f"front_end.feature_extractor.conv_layers.0.layer_norm.{part}",
            source[f"feature_extractor.conv_layers.0.2.{part}"])
        put(f"front_end.feature_projection.projection.{part}", source[f"post_extract_proj.{part}"])
        put(f"front_end.layer_norm.{part}", source[f"encoder.layer_norm.{part}"])
    put("front_end.pos_conv_embed.conv.parametrizations.weight.original0", source["encoder.pos_conv.0.weight_g"])
    put("front_end.pos_conv_embed.conv.parametrizations.weight.original1", source["encoder.pos_conv.0.weight_v"])
    put("front_end.pos_conv_embed.conv.bias", source["encoder.pos_conv.0.bias"])
    for layer in range(len(student.layers)):
        theirs, mine = f"encoder.layers.{layer}.", f"layers.{layer}."
        for part in ("weight", "bias"):
            put(f"{mine}attention.in_proj_{part}",
                torch.cat([source[f"{theirs}self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")]))
            put(f"{mine}attention.out_proj.{part}", source[f"{theirs}self_attn.out_proj.{part}"])
            put(f"{mine}layer_norm.{part}", source[f"{theirs}self_attn_layer_norm.{part}"])
            put(f"{mine}feed_forward.intermediate_dense.{part}", source[f"{theirs}fc1.{part}"])
            put(f"{mine}feed_forward.output_dense.{part}", source[f"{theirs}fc2.{part}"])
            put(f"{mine}final_layer_norm.{part}", source[f"{theirs}final_layer_norm.{part}"])
    # output_layer = Linear(768, 768 * n) -> GELU -> SplitLinear(768, n, 768): head k is the k-th slice of both.
    expand_weight, expand_bias = source["output_layer.0.weight"], source["output_layer.0.bias"]
    split_weight, split_bias = source["output_layer.2.weight"], source["output_layer.2.bias"]
    width = split_weight.shape[1]
    for head in range(len(student.heads)):
        rows = slice(head * width, (head + 1) * width)
        put(f"heads.{head}.0.weight", expand_weight[rows])
        put(f"heads.{head}.0.bias", expand_bias[rows])
        put(f"heads.{head}.2.weight", split_weight[head].T)
        put(f"heads.{head}.2.bias", split_bias[0, 0, head])
    assert written == set(target), set(target) - written


@pytest.fixture(scope="module")
def models() -> tuple[DistillerModel, DistilHubertStudent]:
    """s3prl's model (its own random initialisation) and kd's paper student holding the same weights, in eval mode."""
    torch.manual_seed(0)
    reference = DistillerModel(DistillerConfig(copy.deepcopy(S3PRL_MODEL_CONFIG))).eval()
    student = DistilHubertStudent(paper_student_config(), teacher_dim=768).eval()
    copy_s3prl_into_kd(reference, student)
    return reference, student


def waveforms(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    waveform = torch.zeros(len(lengths), max(lengths))
    for row, length in enumerate(lengths):
        waveform[row, :length] = torch.randn(length, generator=generator)
    return waveform, torch.tensor(lengths)


def s3prl_forward(reference: DistillerModel, waveform: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """s3prl's hidden states (after the encoder's layer norm, then each layer), predictions ``(B, N, T, D)`` and
    valid-frame mask."""
    pad_mask = (torch.arange(waveform.shape[1])[None] < lengths[:, None]).float()
    captured: list[torch.Tensor] = []
    hook = reference.encoder.layer_norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        _, _, pred, frame_mask, layer_hiddens = reference(waveform, pad_mask, get_hidden=True)
    finally:
        hook.remove()
    return [captured[0], *layer_hiddens], pred, frame_mask.bool()


def test_paper_preset_has_s3prls_parameter_count(models: tuple[DistillerModel, DistilHubertStudent]) -> None:
    reference, student = models
    reference_deployed = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("output_"))
    assert reference_deployed == PAPER_PARAMETERS
    assert student.parameter_count_excluding() == PAPER_PARAMETERS
    assert student.num_parameters() - student.parameter_count_excluding() == HEAD_PARAMETERS
    assert sum(p.numel() for p in reference.output_layer.parameters()) == HEAD_PARAMETERS


def test_hidden_states_and_predictions_equal_s3prls(models: tuple[DistillerModel, DistilHubertStudent]) -> None:
    reference, student = models
    waveform, lengths = waveforms([6400, 4800])  # the second utterance padded
    batch = {"waveform": waveform, "waveform_lengths": lengths}
    with torch.no_grad():
        theirs, their_pred, their_mask = s3prl_forward(reference, waveform, lengths)
        mine = student.forward_signals(batch, SignalRequest())
        my_pred, my_mask = student.predict(batch)
    assert torch.equal(my_mask, their_mask)
    assert len(mine.hidden_states) == len(theirs) == 3
    for index, (a, b) in enumerate(zip(mine.hidden_states, theirs)):
        assert (a - b)[my_mask].abs().max() <= 1e-5, index
    for head, prediction in enumerate(my_pred):
        assert (prediction - their_pred[:, head])[my_mask].abs().max() <= 1e-5, head


def test_loss_and_gradients_equal_s3prls(models: tuple[DistillerModel, DistilHubertStudent]) -> None:
    """The preset's objective on the heads equals s3prl's loss; its gradients (the CNN's scaled by 0.1) s3prl's."""
    reference, student = models
    waveform, lengths = waveforms([4800, 4800], seed=1)  # no padding: s3prl's loss also scores padding frames
    batch = {"waveform": waveform, "waveform_lengths": lengths}
    frames = int(conv_output_lengths(lengths, student.front_end.conv_layers)[0])
    targets = torch.randn(2, 3, frames, 768, generator=torch.Generator().manual_seed(2))
    objective_spec = DistilHubertMethod.presets["paper"]["objectives"]["kd"]
    objective = DistilHubertObjective(DistilHubertObjective.Config.model_validate(objective_spec["args"]))

    reference.zero_grad()
    _, their_pred, _ = s3prl_forward(reference, waveform, lengths)
    their_loss = s3prl_loss(their_pred, targets, S3PRL_MODEL_CONFIG["cosine_loss"])
    their_loss.backward()

    student.zero_grad()
    my_pred, mask = student.predict(batch)
    output = objective(Signals(hidden_states=tuple(my_pred)),
                       Signals(hidden_states=tuple(targets.unbind(1)), extra={HIDDEN_LAYER_IDS: (4, 8, 12)}),
                       {"attention_mask": mask})
    my_loss = objective_spec["weight"] * output.loss
    my_loss.backward()

    assert bool(mask.all()) and mask.shape[1] == frames
    assert abs(my_loss.item() - their_loss.item()) <= 1e-5
    theirs, mine = dict(reference.named_parameters()), dict(student.named_parameters())
    cnn = "front_end.feature_extractor.conv_layers"
    pairs = {  # the first and last conv (scaled by feature_grad_mult), the projection, a layer and a head
        f"{cnn}.0.conv.weight": theirs["feature_extractor.conv_layers.0.0.weight"].grad,
        f"{cnn}.6.conv.weight": theirs["feature_extractor.conv_layers.6.0.weight"].grad,
        "front_end.feature_projection.projection.weight": theirs["post_extract_proj.weight"].grad,
        "layers.1.feed_forward.output_dense.weight": theirs["encoder.layers.1.fc2.weight"].grad,
        "heads.2.2.weight": theirs["output_layer.2.weight"].grad[2].T,
    }
    for name, their_grad in pairs.items():
        my_grad = mine[name].grad
        scale = their_grad.abs().max()
        assert scale > 0, name
        assert (my_grad - their_grad).abs().max() <= 1e-4 * scale, name


def test_initialisation_copies_what_s3prl_copies(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    """DistillerForPretrain copies the CNN, post_extract_proj, pos_conv and the layers; not the encoder's layer norm
    (and the student has no LayerNorm over the CNN channels to copy into)."""
    teacher = teacher_factory("hubert", layers=4)
    with torch.no_grad():  # a teacher layer norm that differs from a fresh one, so copying it would show
        teacher.model.encoder.layer_norm.weight.fill_(2.0)
        teacher.model.encoder.layer_norm.bias.fill_(0.5)
    paper_args = DistilHubertMethod.presets["paper"]["student"]["args"]
    s3prl_keys = ("head", "front_end_layout", "feature_grad_mult", "init_from_teacher")
    config = DistilHubertStudentConfig(**tiny_sizes, **{key: paper_args[key] for key in s3prl_keys})
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)
    student = DistilHubertStudentFactory().build(config, context)
    model, front_end = teacher.model, student.front_end
    assert not hasattr(front_end.feature_projection, "layer_norm")
    assert torch.equal(front_end.feature_projection.projection.weight, model.feature_projection.projection.weight)
    assert torch.equal(front_end.feature_extractor.conv_layers[1].conv.weight,
                       model.feature_extractor.conv_layers[1].conv.weight)
    assert torch.equal(front_end.pos_conv_embed.conv.bias, model.encoder.pos_conv_embed.conv.bias)
    assert torch.equal(student.layers[1].feed_forward["output_dense"].weight,
                       model.encoder.layers[1].feed_forward.output_dense.weight)
    assert torch.equal(front_end.layer_norm.weight, torch.ones_like(front_end.layer_norm.weight))
    assert torch.equal(front_end.layer_norm.bias, torch.zeros_like(front_end.layer_norm.bias))


def test_paper_preset_trainer_is_s3prls_recipe(models: tuple[DistillerModel, DistilHubertStudent]) -> None:
    trainer = TrainerConfig.model_validate(DistilHubertMethod.presets["paper"]["trainer"])
    assert (trainer.max_steps, trainer.batch_size, trainer.clip_norm) == (
        S3PRL_RUNNER["total_steps"], S3PRL_RUNNER["train_batch_size"], S3PRL_RUNNER["gradient_clipping"])
    optimizer = build_optimizer(models[1], trainer)
    for group in optimizer.param_groups:
        assert group["lr"] == S3PRL_OPTIMIZER["lr"]
        assert tuple(group["betas"]) == S3PRL_OPTIMIZER["betas"] and group["eps"] == S3PRL_OPTIMIZER["eps"]
    assert {group["weight_decay"] for group in optimizer.param_groups} == {S3PRL_WEIGHT_DECAY, 0.0}
    # s3prl's WarmupLinearSchedule multiplies the lr by get_lr(k) at its k-th update; kd's LambdaLR by
    # lr_factor(k - 1). They agree to one step's worth of the decay (1 / 186,000).
    schedule = WarmupLinearSchedule(warmup=S3PRL_OPTIMIZER["warmup_proportion"], t_total=S3PRL_RUNNER["total_steps"])
    for update in (1, 2, 7000, 13999, 14000, 14001, 100000, 199999, 200000):
        assert abs(lr_factor(update - 1, trainer) - schedule.get_lr(update)) <= 1e-5, update
