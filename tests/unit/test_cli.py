"""The CLI without a server: arguments, where its URL comes from, one-line errors, exit codes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from threadgate import cli
from threadgate.devstack import free_port

pytestmark = pytest.mark.unit


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chunks=200", ("chunks", 200)),
        ("vary=true", ("vary", True)),
        ("fail=transient", ("fail", "transient")),
        ("delay_ms=2.5", ("delay_ms", 2.5)),
        ('nested={"a": [1]}', ("nested", {"a": [1]})),
        ("empty=", ("empty", "")),
        ("eq=a=b", ("eq", "a=b")),
    ],
)
def test_options_are_json_when_they_parse(text: str, expected: tuple[str, object]) -> None:
    assert cli.parse_option(text) == expected


def test_a_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["post", "t", "hi", "--option", "chunks"], capsys)
    assert code == cli.USAGE and "expected key=value" in err


def test_url_comes_from_the_flag_the_environment_the_dev_stack_or_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THREADGATE_URL", raising=False)
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    monkeypatch.chdir(project / "sub")
    assert cli.resolve_urls(None) == (
        [cli.DEFAULT_URL],
        "the default URL; is `threadgate dev` running?",
    )
    (project / ".threadgate").mkdir()
    urls = project / ".threadgate" / "urls"
    urls.write_text("http://localhost:8100\nhttp://localhost:8101\n")
    assert cli.resolve_urls(None) == (
        ["http://localhost:8100", "http://localhost:8101"],
        str(urls),
    )
    monkeypatch.setenv("THREADGATE_URL", "http://a:1/, http://b:2")
    assert cli.resolve_urls(None) == (["http://a:1", "http://b:2"], "$THREADGATE_URL")
    assert cli.resolve_urls("http://c:3") == (["http://c:3"], "--url")


def test_no_server_is_one_line_and_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["runs", "t"], ["attach", "t"], ["post", "t", "hi", "--attach"]):
        code, _, err = run([*argv, "--url", url], capsys)
        assert code == cli.UNREACHABLE, (argv, err)
        assert err.startswith(f"threadgate: cannot reach {url} (--url)")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_dev_refuses_a_busy_port_before_starting_anything(
    busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    code, _, err = run(["dev", "--port", str(busy_port), "--state-dir", str(state)], capsys)
    assert code == cli.USAGE
    assert f"port {busy_port} is in use; try --port " in err
    assert len(err.strip().splitlines()) == 1
    assert not state.exists()  # nothing was started, not even a state directory


def test_dev_refuses_a_busy_port_among_its_pods_ports(
    busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["dev", "--pods", "3", "--port", str(busy_port - 2), "--state-dir", str(tmp_path)]
    code, _, err = run(argv, capsys)
    # Other ports of the range may be taken too (by anyone on the machine): ours is named.
    assert code == cli.USAGE and "in use" in err and str(busy_port) in err


@pytest.mark.parametrize("pods", ["0", "-2"])
def test_dev_refuses_no_pods(pods: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["dev", "--pods", pods, "--state-dir", str(tmp_path / "s")], capsys)
    assert code == cli.USAGE and "--pods must be at least 1" in err
    assert not (tmp_path / "s").exists()


def test_dev_refuses_a_busy_database_port(
    busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["dev", "--port", "0", "--pg-port", str(busy_port), "--state-dir", str(tmp_path / "s")]
    code, _, err = run(argv, capsys)
    assert code == cli.USAGE and f"port {busy_port} is in use (--pg-port)" in err


def test_dev_kill_without_a_stack_here_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["dev", "kill", "threadgate-9", "--state-dir", str(tmp_path)], capsys)
    assert code == cli.USAGE
    assert (
        err == f"threadgate: dev: no threadgate dev is running on {tmp_path} (no pods.json there)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "t", "--url", "localhost:8001"],
        ["post", "t", "hi", "--url", "http://localhost:8000,localhost:8001"],
        ["attach", "t", "--url", "ftp://localhost:8001"],
    ],
)
def test_a_url_without_its_scheme_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == cli.USAGE and out == ""
    assert len(err.splitlines()) == 1 and "is not an http:// or https:// URL" in err, err
    if "localhost:8001" in argv[-1] and "ftp" not in argv[-1]:
        assert "did you mean http://localhost:8001?" in err


def test_threadgate_url_without_its_scheme_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("THREADGATE_URL", "localhost:8001")
    code, _, err = run(["runs", "t"], capsys)
    assert code == cli.USAGE
    assert err.startswith("threadgate: $THREADGATE_URL: 'localhost:8001' is not")


@pytest.mark.parametrize("thread", ["", "x/y", "a.b", "a b", "x" * 129])
def test_a_bad_thread_id_is_refused_before_anything_is_sent(
    thread: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sent, `post "" hi` and `messages x/y` met no route (404 "Not Found"); the URL here
    answers nothing, so a request would have been exit 3."""
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["post", thread, "hi"], ["messages", thread], ["runs", thread]):
        code, _, err = run([*argv, "--url", url], capsys)
        assert code == cli.USAGE, (argv, err)
        assert len(err.splitlines()) == 1 and f"{thread!r} is not a thread id" in err, err


def test_usage_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bogus"], ["runs"], ["runs", "t", "--limit", "x"]):
        code, _, err = run(argv, capsys)
        assert code == cli.USAGE and len(err.splitlines()) == 1, err
        assert err.startswith("threadgate: ") and "--help" in err


def test_exit_statuses_are_listed_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for status, meaning in cli.EXIT.items():
        assert f"{status} {meaning}" in out.replace("\n", " ").replace("  ", " ")


def test_a_crash_loop_backs_off_and_a_healthy_minute_resets_it() -> None:
    from threadgate.supervisor import restart_delay

    delays, previous = [], 0.0
    for _ in range(8):
        previous = restart_delay(previous, lived=2.0)
        delays.append(previous)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(30, lived=59.0) == 30
    assert restart_delay(30, lived=60.0) == 1
