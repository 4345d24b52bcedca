"""The terminal side of a command: SIGTERM as Ctrl-C, --verbose for Ray Data, a local Ray's settings."""

import os
import signal
import threading

import pytest
import ray

from jobs import console


@pytest.fixture
def sigterm_restored():
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


def test_sigterm_while_ray_starts_interrupts_as_ctrl_c(monkeypatch, sigterm_restored):
    """ray.init's own SIGTERM handler exits with code 15 while Ray starts: that is an interrupt (the command says
    how to go on, exit 130), and the next SIGTERM interrupts too; any other exit of ray.init stays what it is."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def init(code):
        def fail(**kwargs):
            raise SystemExit(code)
        return fail

    monkeypatch.setattr(ray, "init", init(signal.SIGTERM))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(KeyboardInterrupt):
        console.start_ray()
    assert signal.getsignal(signal.SIGTERM) is console.raise_interrupt
    monkeypatch.setattr(ray, "init", init(1))
    with pytest.raises(SystemExit) as exit:
        console.start_ray()
    assert exit.value.code == 1


def test_sigterm_handler_is_set_from_the_main_thread_only(sigterm_restored):
    """signal.signal raises ValueError outside the main thread: the Python API called from a thread still runs."""
    errors = []
    thread = threading.Thread(target=lambda: _call(console.interrupt_on_sigterm, errors))
    thread.start()
    thread.join()
    assert errors == []


def _call(fn, errors):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded for the assertion
        errors.append(err)


def test_verbose_turns_ray_datas_progress_bars_on_and_quiet_off():
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    try:
        console.quiet_ray_data(True)
        assert context.enable_progress_bars and context.print_on_execution_start
        console.quiet_ray_data(False)
        assert not context.enable_progress_bars and not context.print_on_execution_start
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def test_a_local_rays_settings_leave_the_callers_own(monkeypatch):
    key = next(iter(console.LOCAL_RAY_SETTINGS))
    monkeypatch.setenv(key, "5000")
    console.local_ray_settings()
    assert os.environ[key] == "5000"
    monkeypatch.delenv(key)
    console.local_ray_settings()
    assert os.environ[key] == console.LOCAL_RAY_SETTINGS[key]
