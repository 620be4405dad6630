"""Run configuration: defaults <- YAML/JSON file <- dotted overrides, validated into one-line
ConfigErrors that name the offending key, and a lossless dict/JSON/YAML round trip."""

from __future__ import annotations

import json

import pytest
import yaml

from meanflow.errors import ConfigError
from meanflow.runs.config import RunConfig, apply_overrides, load_config, train_bytes


def test_defaults_validate():
    """The default config is valid, and load_config() with nothing given returns it."""
    cfg = RunConfig()
    assert cfg.validate() is cfg
    assert load_config() == cfg
    assert load_config(None, []) == RunConfig()


def test_yaml_file_loads_and_reads_exponent_floats(tmp_path):
    """A YAML file sets nested values; YAML 1.1's string '1e-4' is read as the float 1e-4."""
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  p: 0.5\n  kind: flow_matching\n"
                    "optim:\n  lr: 1e-4\n  betas: [0.5, 0.99]\n"
                    "train:\n  steps: 7\n  ema_decays: [0.9, 0.99]\n")
    cfg = load_config(path)
    assert cfg.objective.p == 0.5 and cfg.objective.kind == "flow_matching"
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4
    assert cfg.optim.betas == [0.5, 0.99]
    assert cfg.train.steps == 7 and cfg.train.ema_decays == [0.9, 0.99]
    # Untouched values keep their defaults.
    assert cfg.objective.c == RunConfig().objective.c
    assert cfg.model == RunConfig().model


def test_json_file_loads(tmp_path):
    """A JSON file (a subset of YAML) is accepted the same way."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": {"name": "moons", "options": {"noise": 0.2}},
                                "model": {"options": {"width": 16}},
                                "optim": {"grad_clip": None, "lr": 0.01},
                                "train": {"batch_size": 32}}))
    cfg = load_config(path)
    assert cfg.data.name == "moons" and cfg.data.options == {"noise": 0.2}
    assert cfg.model.options == {"width": 16}
    assert cfg.train.batch_size == 32
    assert cfg.optim.grad_clip is None and cfg.optim.lr == 0.01


def test_empty_file_gives_defaults(tmp_path):
    """An empty config file means "all defaults"."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


def test_dotted_overrides_are_typed_and_win_over_the_file(tmp_path):
    """Overrides parse as YAML (numbers, lists, null), lr '1e-4' is a float, and they are
    applied after the file."""
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  p: 0.7\n")
    cfg = load_config(path, ["objective.p=0.5", "optim.lr=1e-4", "train.steps=12",
                             "objective.t_interval=[0.1, 0.9]", "optim.grad_clip=null",
                             "data.class_conditional=true"])
    assert cfg.objective.p == 0.5
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1e-4
    assert cfg.train.steps == 12 and type(cfg.train.steps) is int
    assert cfg.objective.t_interval == [0.1, 0.9]
    assert cfg.optim.grad_clip is None
    assert cfg.data.class_conditional is True


def test_later_override_wins():
    """Of two overrides of one key, the last applies."""
    assert load_config(None, ["objective.p=0.3", "objective.p=0.6"]).objective.p == 0.6


@pytest.mark.parametrize("override,key", [
    ("objective.foo=1", "objective.foo"),
    ("modle.name=mlp", "modle"),
    ("train.step=5", "train.step"),
])
def test_unknown_key_is_named(override, key):
    """An unknown key raises ConfigError whose message names the full dotted key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_unknown_key_in_file_is_named(tmp_path):
    """The same holds for a key that comes from a file."""
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)


# (override(s), a piece of the message that names the problem)
INVALID = [
    (["objective.fraction_r_neq_t=1.5"], "fraction_r_neq_t"),
    (["objective.fraction_r_neq_t=-0.1"], "fraction_r_neq_t"),
    (["objective.p=-1"], "objective.p"),
    (["objective.p=-0.001"], "objective.p"),
    (["objective.c=0"], "objective.c"),
    (["objective.c=-1e-3"], "objective.c"),
    (["objective.kind=diffusion"], "objective.kind"),
    (["objective.time_sampler=gamma"], "time_sampler"),
    (["objective.jvp=magic"], "objective.jvp"),
    (["objective.kind=flow_matching", "objective.time_sampler=v1"], "v1"),
    (["objective.kappa=1.0", "data.class_conditional=true"], "kappa"),
    (["objective.kappa=1.5", "data.class_conditional=true"], "kappa"),
    (["objective.kappa=-0.1", "data.class_conditional=true"], "kappa"),
    (["objective.t_interval=[0.8, 0.2]"], "t_interval"),
    (["objective.t_interval=[0.0, 1.5]"], "t_interval"),
    (["objective.t_interval=[-0.1, 0.5]"], "t_interval"),
    (["objective.t_interval=[0.5]"], "t_interval"),
    (["objective.t_interval=half"], "t_interval"),
    (["objective.omega=1.5"], "class_conditional"),
    (["objective.kappa=0.2"], "class_conditional"),
    (["objective.sigma=0"], "objective.sigma"),
    (["objective.label_drop=1.5"], "label_drop"),
    (["objective.p=nan"], "objective.p"),
    (["objective.tangent=v02"], "objective.tangent"),
    (["objective.tangent=v11"], "objective.tangent"),
    (["objective.jvp=split_func"], "objective.jvp"),
    (["objective.jvp_precision=fp16"], "objective.jvp_precision"),
    (["objective.r_eq_t_rows=last"], "objective.r_eq_t_rows"),
    (["objective.label_drop_rows=last"], "objective.label_drop_rows"),
    (["objective.sigma_r=-1"], "objective.sigma_r"),
    (["objective.mu=inf"], "objective.mu"),
    (["objective.kind=flow_matching", "objective.p=-1"], "objective.p"),
    (["data.augment=1.5"], "data.augment="),
    (["data.augment=true"], "data.augment="),
    (["data.augment_options={xflip: -1}"], "data.augment_options.xflip"),
    (["data.augment_options={flip: 1}"], "data.augment_options"),
    (["objective.p=true"], "objective.p"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-3"], "optim.lr"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.betas=[0.9]"], "betas"),
    (["optim.betas=[1.0, 0.999]"], "betas"),
    (["optim.betas=[0.9, -0.1]"], "betas"),
    (["optim.betas=0.9"], "betas"),
    (["optim.weight_decay=-1"], "weight_decay"),
    (["optim.grad_clip=0"], "grad_clip"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=-3"], "train.steps"),
    (["train.steps=2.5"], "train.steps"),
    (["train.batch_size=0"], "batch_size"),
    (["train.log_every=0"], "log_every"),
    (["train.checkpoint_every=0"], "checkpoint_every"),
    (["train.keep_checkpoints=-1"], "keep_checkpoints"),
    (["train.ema_decays=[1.0]"], "ema_decays"),
    (["train.ema_decays=[0.999, 1.0]"], "ema_decays"),
    (["train.ema_decays=[0.0]"], "ema_decays"),
    (["train.ema_decays=0.999"], "ema_decays"),
    (["train.device=tpu"], "train.device"),
    (["data.name="], "data.name"),
    (["model.options=3"], "model.options"),
    (["model.jvp_attention=flash"], "model.jvp_attention"),
    (["model.jvp_attention=3"], "model.jvp_attention"),
    (["train.fsdp=3"], "train.fsdp"),
    (["train.ema_warmup=3"], "train.ema_warmup"),
    (["objective=3"], "objective"),
]


@pytest.mark.parametrize("overrides,needle", INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_values_raise_config_error(overrides, needle):
    """Every out-of-range or unknown value raises a one-line ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_validate_checks_a_config_built_in_python():
    """validate() also catches values set on the dataclasses directly."""
    cfg = RunConfig()
    cfg.objective.fraction_r_neq_t = 2.0
    with pytest.raises(ConfigError, match="fraction_r_neq_t"):
        cfg.validate()


@pytest.mark.parametrize("overrides", [
    ["objective.fraction_r_neq_t=0"], ["objective.fraction_r_neq_t=1"], ["objective.p=0"],
    ["objective.kappa=0.99", "data.class_conditional=true"],
    ["objective.omega=1.5", "objective.kappa=0.2", "data.class_conditional=true"],
    ["objective.t_interval=[0.3, 0.3]"], ["optim.betas=[0, 0.5]"],
    ["objective.kind=flow_matching", "objective.time_sampler=uniform"],
    ["train.device=cuda:1"], ["optim.grad_clip=1.0"],
    ["objective.jvp=auto"], ["objective.jvp=split"], ["objective.jvp=func"],
    ["objective.jvp=forward_ad"], ["objective.jvp_precision=amp"],
    ["data.augment=1", "data.augment_options={yflip: 1}"],
])
def test_boundary_values_are_accepted(overrides):
    """Values on the edge of each valid range are accepted (the checks are not too strict)."""
    load_config(None, overrides)


def test_guidance_with_class_conditional_is_valid():
    """omega=1.5, kappa=0.2 with data.class_conditional=true is a valid guided config."""
    cfg = load_config(None, ["objective.omega=1.5", "objective.kappa=0.2",
                             "data.class_conditional=true"])
    assert (cfg.objective.omega, cfg.objective.kappa) == (1.5, 0.2)


def test_the_objective_is_validated_by_its_constructors():
    """objective.* is checked by building the loss (MeanFlowLoss / FlowMatchingLoss), whose
    one-line messages are given with the setting's full name; build() gives that loss, with
    the du/dt strategy and other constructor arguments replaceable."""
    from meanflow.objective import FlowMatchingLoss, MeanFlowLoss
    from meanflow.objective.jvp import JVP_CHOICES
    with pytest.raises(ConfigError) as info:
        load_config(None, ["objective.c=0"])
    assert str(info.value).startswith("objective.c=0")
    with pytest.raises(ConfigError) as info:
        load_config(None, ["objective.time_sampler=gamma"])
    assert str(info.value).startswith("unknown objective.time_sampler 'gamma'")
    assert RunConfig().objective.jvp == "auto"
    for jvp in JVP_CHOICES:
        assert load_config(None, [f"objective.jvp={jvp}"]).objective.jvp == jvp
    cfg = load_config(None, ["objective.p=0.5", "objective.fraction_r_neq_t=0.75"])
    loss = cfg.objective.build(3, jvp="func", tangent="v10")
    assert isinstance(loss, MeanFlowLoss) and (loss.p, loss.num_classes) == (0.5, 3)
    assert (loss.jvp, loss.tangent, loss.sampler.fraction_r_neq_t) == ("func", "v10", 0.75)
    assert cfg.objective.build().jvp == "auto"
    fm = load_config(None, ["objective.kind=flow_matching"]).objective.build(jvp="split")
    assert isinstance(fm, FlowMatchingLoss)
    with pytest.raises(ConfigError, match="unknown objective.tangent 'v02'"):
        cfg.objective.build(tangent="v02")


def test_the_removed_tangent_setting_reads_as_its_default():
    """objective.tangent left the config (the wrong tangents are MeanFlowLoss(tangent=...));
    a saved config that holds its default "v01" still loads, any other value is refused."""
    d = RunConfig().to_dict()
    assert "tangent" not in d["objective"]
    d["objective"]["tangent"] = "v01"
    assert RunConfig.from_dict(d) == RunConfig()
    d["objective"]["tangent"] = "v10"
    with pytest.raises(ConfigError, match="objective.tangent='v10' is no longer a config "
                                          r"setting.*MeanFlowLoss\(tangent=\.\.\.\)"):
        RunConfig.from_dict(d)


def test_malformed_override_raises():
    """An override without '=' raises ConfigError showing the expected form."""
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["objective.p"])


def test_override_into_a_scalar_raises():
    """A dotted key that descends into a scalar value is refused."""
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"objective": {"p": 1.0}}, ["objective.p.q=1"])


@pytest.mark.parametrize("text,needle", [
    ("objective: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "mapping"),
    ("objective: 3\n", "objective"),
])
def test_bad_file_contents_raise(tmp_path, text, needle):
    """Unparsable YAML, a top-level list or a non-mapping section give ConfigError."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_missing_file_raises_with_path(tmp_path):
    """A missing config file raises ConfigError naming the path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def _custom() -> RunConfig:
    return load_config(None, [
        "model.options={width: 16, depth: 1, emb_dim: 8, dropout: 0.1}",
        "data.name=moons", "data.options={noise: 0.2}", "data.class_conditional=true",
        "objective.omega=1.5", "objective.kappa=0.2", "objective.t_interval=[0.1, 0.8]",
        "objective.jvp=func", "optim.lr=3e-4", "optim.grad_clip=2.5",
        "train.ema_decays=[0.9, 0.99]", "train.progress=false", "train.steps=5"])


@pytest.mark.parametrize("make", [RunConfig, _custom], ids=["defaults", "custom"])
def test_round_trips(tmp_path, make):
    """to_dict -> from_dict, to_json -> from_dict and to_yaml -> load_config give an equal
    config (nothing lost or retyped)."""
    cfg = make()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_to_dict_is_a_copy():
    """Mutating the dict from to_dict does not change the config."""
    cfg = RunConfig()
    d = cfg.to_dict()
    d["optim"]["betas"].append(0.5)
    d["objective"]["p"] = 7
    assert cfg.optim.betas == [0.9, 0.999] and cfg.objective.p == 1.0


# ------------------------------------------------------------------- model.jvp_attention

def _dit_run_config(data, impl, steps: int = 3, **train_opts):
    tr = {"steps": steps, "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
          "progress": False, "sample_count": 0, "device": "cpu", "keep_checkpoints": 0}
    tr.update(train_opts)
    return RunConfig.from_dict({
        "model": {"name": "dit-s/2", "options": {"depth": 1, "width": 32, "heads": 2},
                  "jvp_attention": impl},
        "data": {"name": str(data)},
        "objective": {"fraction_r_neq_t": 0.5, "p": 0.5},
        "optim": {"lr": 1e-2},
        "train": tr}).validate()


def test_jvp_attention_names_the_choices_from_the_attention_module(monkeypatch):
    """The choices are read from meanflow.models.attention.JVP_ATTENTION_IMPLS when
    validating (not a copy); null is the module default."""
    from meanflow.models import attention
    assert load_config(None, ["model.jvp_attention=null"]).model.jvp_attention is None
    assert load_config(None, ["model.jvp_attention=chunked"]).model.jvp_attention == "chunked"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.jvp_attention=flash"])
    msg = str(info.value)
    assert "\n" not in msg and all(impl in msg for impl in attention.JVP_ATTENTION_IMPLS)
    monkeypatch.setattr(attention, "JVP_ATTENTION_IMPLS", (*attention.JVP_ATTENTION_IMPLS,
                                                           "flash"))
    assert load_config(None, ["model.jvp_attention=flash"]).model.jvp_attention == "flash"


def test_jvp_attention_chunked_trains_like_math(tmp_path, monkeypatch):
    """A tiny DiT run with model.jvp_attention=chunked runs the chunked attention JVP (and
    math does not) and logs the same losses as math to float32 precision; the key may change
    on resume."""
    import numpy as np

    from meanflow.models import attention
    from meanflow.train.loop import train
    rng = np.random.default_rng(0)
    data = tmp_path / "imgs.npz"
    np.savez(data, x=rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
    calls = {"n": 0}
    real = attention.attention_jvp

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(attention, "attention_jvp", counting)
    losses = {}
    for impl in ("math", "chunked"):
        calls["n"] = 0
        train(_dit_run_config(data, impl), tmp_path / impl)
        lines = [json.loads(s) for s in (tmp_path / impl / "metrics.jsonl").read_text()
                 .splitlines()]
        losses[impl] = [d["loss"] for d in lines]
        assert (calls["n"] > 0) == (impl == "chunked")
    # step 1: the adaLN-zero DiT outputs 0 whatever the attention; steps 2 and 3 depend on it
    assert losses["math"][1] != losses["math"][0]
    for a, b in zip(losses["math"], losses["chunked"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    calls["n"] = 0
    train(_dit_run_config(data, "chunked", steps=4), tmp_path / "math", resume=True)
    assert calls["n"] > 0
    bad = _dit_run_config(data, "math")
    bad.model.jvp_attention = "flash"
    with pytest.raises(ConfigError, match="model.jvp_attention 'flash'"):
        train(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_jvp_attention_chunked_loss_equals_math_on_a_trained_like_dit(monkeypatch):
    """The loss of a DiT with random (not adaLN-zero) weights, whose du/dt leans on the
    attention: chunked equals math to float32 precision, and an attention JVP that drops its
    tangent is far off, so the equality means something."""
    import torch
    import torch.nn.functional as F
    from torch.autograd import forward_ad

    from meanflow.models import attention, build_model
    from meanflow.objective import MeanFlowLoss
    torch.manual_seed(0)
    net = build_model("dit-s/2", in_channels=1, input_size=8, depth=1, width=32, heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    t = 0.5 + 0.5 * torch.rand(8, generator=g)
    draws = {"r": torch.zeros(8), "t": t, "e": torch.randn(8, 1, 8, 8, generator=g)}
    loss_fn = MeanFlowLoss(p=0.0)

    def loss_with(impl):
        attention.set_jvp_attention(net, impl)
        return float(loss_fn(net, x, None, generator=g, **draws)[0].detach().mean())

    math_loss, chunked = loss_with("math"), loss_with("chunked")
    assert chunked == pytest.approx(math_loss, rel=1e-5)
    strip = lambda a: forward_ad.unpack_dual(a).primal  # noqa: E731
    monkeypatch.setattr(attention, "attention_jvp", lambda q, k, v, chunk=None:
                        F.scaled_dot_product_attention(strip(q), strip(k), strip(v)))
    dropped = loss_with("chunked")
    assert abs(dropped - math_loss) > 1e-3 * abs(math_loss)


@pytest.mark.parametrize("overrides, needle", [
    (["train.seed=18446744073709551616"], "train.seed=18446744073709551616 must be <="),
    (["model.name=[1]"], "model.name=[1] must be a backbone name"),
    (["objective.kind=[1]"], "objective.kind and objective.time_sampler must be names"),
])
def test_unbounded_and_unhashable_values_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_largest_seed_is_accepted():
    assert load_config(None, ["train.seed=18446744073709551615"]).train.seed == 2 ** 64 - 1


def test_a_deeply_nested_file_is_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
    assert load_config(None, ["model.options.x=" + "[" * 3000]).model.options["x"] \
        == "[" * 3000        # an override that does not parse stays the text it was


def test_train_bytes_counts_weights_optimizer_emas_and_a_batch():
    cfg = load_config(None, ["train.batch_size=8", "train.ema_decays=[0.9, 0.99]"])
    # 4 bytes x ((weights, grads, 2 Adam moments, 2 EMAs) x 10 params + 4 x 8 x 3)
    assert train_bytes(cfg, num_params=10, sample_numel=3) == 4 * (6 * 10 + 4 * 8 * 3)
    assert train_bytes(cfg, 10, 3, world_size=2) == 4 * (6 * 10 + 4 * 4 * 3)


def test_a_files_data_options_stay_with_its_data(tmp_path):
    """A file's data.options belong to its data.name: overrides naming other data drop them
    (a preset used on one's own folder), the same data keeps them, and options given in the
    overrides are kept either way."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: fashion-mnist, options: {split: train}}\n")
    assert load_config(path, ["data.name=moons"]).data.options == {}
    assert load_config(path, ["data.name=fashion-mnist"]).data.options == {"split": "train"}
    assert load_config(path).data.options == {"split": "train"}
    assert load_config(path, ["data.name=spirals", "data.options.n=100"]).data.options == \
        {"n": 100}
    assert load_config(path, ["data.options.split=test"]).data.options == {"split": "test"}


def test_new_runs_warm_the_ema_up():
    """train.ema_warmup is on by default (docs/method.md, EMA warm-up)."""
    assert RunConfig().train.ema_warmup is True
    assert load_config(None, ["train.ema_warmup=false"]).train.ema_warmup is False
