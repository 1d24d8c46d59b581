"""Property: whatever overrides a user types, config composition + validation ends in a valid config or in the one-line
error the CLI prints (cli.user_message) — never in an exception that would reach the user as a traceback."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mlxgpt.cli import user_message
from mlxgpt.config import Config, register_configs, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def leaf_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for name in node:
        child, key = node._get_node(name), f"{prefix}{name}"
        keys += leaf_keys(child, key + ".") if OmegaConf.is_dict(child) and name != "callbacks" else [key]
    return keys


KEYS = leaf_keys(OmegaConf.structured(Config)) + [
    "callbacks.checkpoint.keep", "callbacks.evaluation.interval", "model.n_layerz", "trainer", "nope.deeper"]
GROUPS = {group.name: sorted(p.stem for p in group.glob("*.yaml")) for group in CONF.iterdir() if group.is_dir()}

values = st.one_of(  # mostly plausible values of every type, some grammar junk
    st.integers(-2, 6), st.integers(-(2**70), 2**70), st.sampled_from([0.0, 0.5, 1.0, 1e-3, -1e-3, 2.5]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.sampled_from(["x", "cpu", "auto", "stop", "skip", "gpt2", "char", "text", "'1e-3'", "${model.n_layer}",
                     "${nope}", "${oc.env:MLXGPT_NOPE}", "[", "{a: 1}", "a=b", "''"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=4),
    st.lists(st.one_of(st.integers(-2, 3), st.floats(0, 1)), max_size=3))


def as_text(value) -> str:
    """A value as a user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(as_text, value)) + "]"
    return str(value)


value_overrides = st.builds(lambda prefix, key, value: f"{prefix}{key}={as_text(value)}",
                            st.sampled_from([""] * 8 + ["+", "++", "~"]), st.sampled_from(KEYS), values)
group_overrides = st.builds(lambda group, option: f"{group}={option}", st.sampled_from(sorted(GROUPS)),
                            st.one_of(st.sampled_from([o for options in GROUPS.values() for o in options]),
                                      st.sampled_from(["null", "nope", "gpt2_smal", "[a,b]"])))


def outcome(build) -> str | None:
    """None for a valid config, else the one line the CLI prints (cli.user_message); a bug propagates."""
    try:
        validate(build())
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        return message
    return None


def assert_one_line(message: str | None) -> None:
    assert message is None or (message.strip() and "\n" not in message), message


@pytest.fixture(scope="module")
def composed():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(value_overrides, min_size=1, max_size=4))
@example(overrides=["trainer=${model.n_layer}"])  # a typed group replaced by a number
def test_value_overrides_give_a_valid_config_or_one_line(composed, overrides):
    """Hydra's own parser and override step on the composed config (the part of compose after the defaults list)."""

    def build():
        cfg = composed.copy()
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(overrides), cfg)
        return cfg

    assert_one_line(outcome(build))


@settings(max_examples=40, deadline=None)
@given(overrides=st.lists(st.one_of(group_overrides, value_overrides), min_size=1, max_size=3))
def test_full_composition_gives_a_valid_config_or_one_line(overrides):
    def build():
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=overrides)

    assert_one_line(outcome(build))
