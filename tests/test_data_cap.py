"""data.max_examples_per_domain: a seeded subset of each domain, in file order (load_suite)."""

import pytest
from config_helpers import tiny_config

from ideal_jax.configlib.checks import validate_config
from ideal_jax.data import suite as suite_lib
from ideal_jax.data.records import Example
from ideal_jax.utils.errors import InputError


def _domain(name, n):
    return [
        Example(id=f"{name}{i}", domain=name, messages=(("user", f"{name} {i}"),), response=str(i))
        for i in range(n)
    ]


def test_cap_keeps_a_seeded_subset_in_file_order_per_domain():
    domains = {"a": _domain("a", 50), "b": _domain("b", 5)}
    capped = suite_lib.cap_domains(domains, 10, seed=3)
    assert len(capped["a"]) == 10 and capped["b"] == domains["b"]  # short domains stay whole
    ids = [int(ex.response) for ex in capped["a"]]
    assert ids == sorted(ids) and ids != list(range(10))  # file order, not the first ten
    assert capped == suite_lib.cap_domains(domains, 10, seed=3)  # deterministic
    assert capped["a"] != suite_lib.cap_domains(domains, 10, seed=4)["a"]  # seeded
    # A domain's subset does not depend on which other domains exist.
    assert suite_lib.cap_domains({"a": domains["a"]}, 10, seed=3)["a"] == capped["a"]
    assert suite_lib.cap_domains(domains, 0, seed=3) == domains


def test_load_suite_applies_the_cap(tmp_path):
    cfg = tiny_config(**{"data.max_examples_per_domain": 7})
    loaded = suite_lib.load_suite(cfg, str(tmp_path))
    assert loaded.domains and all(len(exs) == 7 for exs in loaded.domains.values())
    assert all(len(loaded.tokenized[d]) == 7 for d in loaded.domains)


@pytest.mark.parametrize("bad", [-1, -40])
def test_a_negative_cap_is_refused_naming_the_field(bad):
    cfg = tiny_config(**{"data.max_examples_per_domain": bad})
    with pytest.raises(InputError, match="max_examples_per_domain"):
        validate_config(cfg)
