"""The shipped configs: their SAE specs are valid, and the synthetic ones train every
architecture on the same synthetic model, the same stream and the same L0, as their comments and the README say."""

from pathlib import Path

import yaml

from saelightning.module import _as_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = ("topk", "batchtopk", "matryoshka", "relu", "gated", "jumprelu")


def test_every_sae_spec_of_every_config_is_valid():
    """What the fit checks of each spec (known fields, options its architecture reads) on every shipped config;
    tests/test_train.py parses the configs themselves."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        for spec in yaml.safe_load(path.read_text())["model"]["saes"]:
            _as_spec(spec)


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"synthetic_{name}.yaml").read_text())


def test_the_small_synthetic_configs_share_the_model_the_stream_and_the_budget():
    sweep = _load("sweep")
    by_arch = {s["architecture"]: s for s in sweep["model"]["saes"]}
    assert sorted(by_arch) == sorted(SMALL)
    for arch in SMALL:
        one = _load(arch)
        assert one["data"] == sweep["data"], arch  # one synthetic model, one stream
        assert one["trainer"]["max_steps"] == sweep["trainer"]["max_steps"], arch  # one sample budget
        assert {k: v for k, v in one["model"].items() if k != "saes"} == \
            {k: v for k, v in sweep["model"].items() if k != "saes"}, arch
        (spec,) = one["model"]["saes"]
        assert spec == by_arch[arch], arch
        assert spec["d_sae"] == 512
    k = {by_arch[a]["k"] for a in ("topk", "batchtopk", "matryoshka")}
    assert k == {8}  # the common L0 of the k-sparse ones (the penalised ones are tuned to it: BENCHMARKS.md)
    assert by_arch["matryoshka"]["matryoshka_prefixes"][-1] == 512


def test_the_16k_config_is_synthsaebench_16k():
    big = _load("16k")
    synth = big["data"]["synthetic"]
    assert (synth["num_features"], synth["d_in"]) == (16384, 768)
    assert {s["d_sae"] for s in big["model"]["saes"]} == {4096}
    assert {s["architecture"] for s in big["model"]["saes"]} == set(SMALL)
    assert {s["k"] for s in big["model"]["saes"] if "k" in s} == {25}
    assert big["trainer"]["max_steps"] * big["data"]["batch_size"] >= 199_999_000  # SynthSAEBench's 200M samples
