"""Every setting's environment variable is checked exactly like its flag (sockops/config.py).

A bad value must be a usage error that names the variable (exit 2, no traceback): an operator
who typed it into agent.env looks for that name. The table below must list every setting of
sockops/config.py, so a new setting without a decision here fails the first test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from test_manifests import all_settings

from sockops import config
from sockops.cli import build_parser

# env -> a value the setting's flag refuses
BAD = {
    "SOCKOPS_BPFFS": None,  # any path: filled below from FREE
    "SOCKOPS_LOG_FORMAT": "JSON",
    "SOCKOPS_LOG_LEVEL": "verbose",
    "SOCKOPS_SOCKHASH_SIZE": "abc",
    "SOCKOPS_PENDING_SIZE": "0",
    "SOCKOPS_NETNS_SIZE": "-5",
    "SOCKOPS_SOURCE": "kubernetes,Docker",
    "NODE_NAME": "Node_A",
    "POD_NAME": "Agent_1",
    "POD_NAMESPACE": "Sockops System",
    "SOCKOPS_RESYNC_SECONDS": "thirty",
    "SOCKOPS_LATE_INSERTION": "yes",
    "SOCKOPS_READER_HOOK": "true",
    "SOCKOPS_METRICS_ADDR": "9876",
    "SOCKOPS_IF_UNSUPPORTED": "Idle",
    "SOCKOPS_DRAIN_TIMEOUT": "inf",
    "SOCKOPS_POD_METRIC_LABELS": "Pod",
    "SOCKOPS_QUEUE_BUDGET": "1000",
    "SOCKOPS_PROXY_UID": "istio-proxy",
    "SOCKOPS_BREAKER_THRESHOLDS": "queue_over_budget=-1",
    "SOCKOPS_BREAKER_COOLDOWN": "-1",
}
# env -> why any string is a value the flag takes too (then env and flag must give the same)
FREE = {
    "SOCKOPS_BPFFS": "a directory path; whether it is on bpffs is checked by the load, with the fix",
    "SOCKOPS_STATE_FILE": "a file path",
    "SOCKOPS_CGROUP": "a directory path; the attach checks it is cgroup v2",
    "SOCKOPS_STATIC_NETNS": "an ip-netns name or a path",
    "KUBECONFIG": "a path list, as kubectl reads it",
    "SOCKOPS_DOCKER_HOST": "any address the docker client understands",
}
BAD = {k: v for k, v in BAD.items() if v is not None}


def subcommand_of(setting: config.Setting) -> str:
    """A sockops command that has this setting's flag."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("agent", "uninstall", "status"):
        if any(setting.flag in a.option_strings for a in sub.choices[name]._actions):
            return name
    raise AssertionError(f"no command has {setting.flag}")


def parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, argparse.Namespace | None]:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0), capsys.readouterr().err, None
    return 0, capsys.readouterr().err, args


def test_every_setting_has_a_decision_here() -> None:
    envs = {s.env for s in all_settings()}
    assert envs == set(BAD) | set(FREE), "add the new setting to BAD (with a refused value) or FREE"
    assert not set(BAD) & set(FREE)


@pytest.mark.parametrize("setting", all_settings(), ids=lambda s: s.env)
def test_environment_is_checked_like_the_flag(
    setting: config.Setting, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = subcommand_of(setting)
    for s in all_settings():
        monkeypatch.delenv(s.env, raising=False)
    if setting.env in BAD:
        value = BAD[setting.env]
        code, err, _ = parse([cmd, setting.flag, value.split(",")[-1]], capsys)
        assert code == 2, f"the flag {setting.flag} {value} was accepted"
        monkeypatch.setenv(setting.env, value)
        code, err, _ = parse([cmd], capsys)
        assert code == 2, f"{setting.env}={value} was accepted"
        assert setting.env in err and repr(value) in err and "Traceback" not in err, err
        assert err.startswith("usage: sockops " + cmd), err
    else:
        value = "/tmp/sockops-settings-test"
        _, _, by_flag = parse([cmd, setting.flag, value], capsys)
        monkeypatch.setenv(setting.env, value)
        _, _, by_env = parse([cmd], capsys)
        assert by_flag is not None and by_env is not None
        assert getattr(by_env, setting.dest) == getattr(by_flag, setting.dest)


def test_a_flag_replaces_the_environment_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOCKOPS_SOURCE", "kubernetes")
    assert build_parser().parse_args(["agent"]).source == ["kubernetes"]
    assert build_parser().parse_args(["agent", "--source", "static"]).source == ["static"]


def test_bad_environment_is_a_usage_error_of_the_process_not_a_traceback() -> None:
    """The issue's reproductions, as a user runs them."""
    sockops = [sys.executable, "-m", "sockops.cli"]
    env = {**os.environ, "SOCKOPS_SOCKHASH_SIZE": "abc"}
    helped = subprocess.run(
        [*sockops, "doctor", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
    res = subprocess.run([*sockops, "agent"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "SOCKOPS_SOCKHASH_SIZE='abc'" in res.stderr, res.stderr
    env = {**os.environ, "SOCKOPS_LOG_FORMAT": "JSON"}
    res = subprocess.run([*sockops, "status"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "SOCKOPS_LOG_FORMAT" in res.stderr, res.stderr


def test_the_agent_gets_a_typed_config_of_exactly_its_settings() -> None:
    """`sockops agent` hands the agent an AgentConfig, not the argparse namespace: one field per
    setting of the agent's parser, each converted (tuples for repeatable ones)."""
    from dataclasses import fields

    assert {f.name for f in fields(config.AgentConfig)} == {s.dest for s in config.AGENT_SETTINGS}
    ns = build_parser().parse_args(["agent", "--source", "static", "--netns", "a", "--netns", "b"])
    cfg = config.AgentConfig.from_namespace(ns)
    assert cfg.source == ("static",) and cfg.netns == ("a", "b")
    assert cfg.sockhash_size == int(config.SIZES[0].default)
    agent_dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["agent"]._actions}
    assert {f.name for f in fields(config.AgentConfig)} <= agent_dests
