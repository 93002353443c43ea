"""Settings: every section validated when the file is read, `--config` and `--set` on every
command (no model is loaded: each case fails or parses before that)."""
from __future__ import annotations

import pytest

from ragserve.cli import _config, _parser, main
from ragserve.config import Config, MetisConfig, ServerConfig, SynthesisConfig
from ragserve.errors import AdmissionRejected, ConfigError
from ragserve.metis.cost import CostConfig
from ragserve.metis.scheduler import SchedulerConfig


@pytest.mark.parametrize("text, needle", [
    ("metis:\n  policy: bogus\n", "metis.policy='bogus' unknown; use one of: fcfs, sjf"),
    ("engine:\n  backend: bogus\n", "engine.backend='bogus' unknown; use one of: local, vllm"),
    ("engine:\n  kv_budget_mb: lots\n", "engine.kv_budget_mb='lots' must be float"),
    ("engine:\n  max_batch_size: 0\n", "engine.max_batch_size=0"),
    ("retrieval:\n  chunk_overlap_tokens: 300\n", "retrieval.chunk_overlap_tokens=300"),
    ("synthesis:\n  answer_tokens: 0\n", "synthesis.answer_tokens=0"),
    ("metis:\n  max_waiting: true\n", "metis.max_waiting=True must be int"),
    ("metis:\n  confidence_threshold: 2\n", "confidence_threshold=2"),
    ("metis:\n  learned_profiler: /nonexistent/learned\n", "metis.learned_profiler='/nonexistent/learned'"),
    ("metis:\n  rules_file: /nonexistent/rules.yaml\n", "planner rules file '/nonexistent/rules.yaml' does not exist"),
])
def test_every_section_is_validated_when_the_file_is_read(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert needle in str(info.value)


def test_a_rules_file_and_the_metis_section_must_agree_at_load(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("confidence_threshold: 0.5\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"metis:\n  rules_file: {rules}\n  confidence_threshold: 0.8\n")
    with pytest.raises(ConfigError, match="set it in one place"):
        Config.load(path)


def test_one_default_per_setting():
    assert SchedulerConfig().max_waiting == MetisConfig().max_waiting
    assert SchedulerConfig().retry_after_s == ServerConfig().retry_after_s
    assert CostConfig().answer_tokens == SynthesisConfig().answer_tokens
    assert CostConfig().default_intermediate_tokens == SynthesisConfig().default_intermediate_tokens
    with pytest.raises(TypeError):
        AdmissionRejected("full")   # every rejection says when to come back


def test_set_overrides_are_typed_and_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metis:\n  policy: fcfs\nengine:\n  kv_budget_mb: 128\n")
    config = Config.load(path, ["metis.policy=sjf", "synthesis.answer_stop=[]", "metis.feedback_every=0"])
    assert config.metis.policy == "sjf" and config.synthesis.answer_stop == () and config.metis.feedback_every == 0
    assert config.engine.kv_budget_mb == 128
    for bad, needle in (("metis.policy=bogus", "use one of: fcfs, sjf"), ("metis.nope=1", "unknown config key metis.nope"),
                        ("policy=sjf", "SECTION.KEY=VALUE"), ("engine.kv_budget_mb=lots", "must be float")):
        with pytest.raises(ConfigError, match=needle):
            Config.load(None, [bad])


@pytest.mark.parametrize("command", [["query", "Who?", "--collection", "c"], ["serve"], ["demo"],
                                     ["ingest", "docs", "--collection", "c"], ["eval", "--dataset", "squad"],
                                     ["tune", "--dataset", "squad"]])
def test_config_and_set_are_accepted_before_and_after_every_command(command):
    args = _parser().parse_args(["--set", "metis.policy=sjf", *command, "--config", "x.yaml",
                                 "--set", "engine.kv_budget_mb=64"])
    assert args.config == "x.yaml"
    assert _parser().parse_args(["--config", "y.yaml", *command]).config == "y.yaml"
    args.config = None
    config = _config(args)
    assert config.metis.policy == "sjf" and config.engine.kv_budget_mb == 64


@pytest.mark.parametrize("where", ["before", "after"])
def test_query_with_a_bad_config_fails_before_loading_a_model(tmp_path, capsys, where):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  backend: bogus\n")
    query = ["query", "Who?", "--collection", "nowhere"]
    argv = ["--config", str(path), *query] if where == "before" else [*query, "--config", str(path)]
    assert main(argv) == 2
    assert "engine.backend='bogus' unknown; use one of: local, vllm" in capsys.readouterr().err
    assert main([*query, "--set", "metis.policy=bogus"]) == 2
    assert "metis.policy='bogus'" in capsys.readouterr().err
