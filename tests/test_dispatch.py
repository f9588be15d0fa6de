"""Backend dispatch: auto picks the first backend that accepts; a named backend never falls back."""

import pytest

from lavin_fast.ops.dispatch import Backend, BackendUnavailable, OpDispatcher


def _op(monkeypatch=None):
    fast = Backend("fast", lambda x: ("fast", x), lambda x: [] if x > 0 else ["x must be positive"])
    ref = Backend("torch", lambda x: ("torch", x))
    return OpDispatcher("unit_test_op", [fast, ref])


def test_auto_takes_first_accepting(monkeypatch):
    monkeypatch.delenv("LAVIN_FAST_BACKEND", raising=False)
    op = _op()
    assert op(3) == ("fast", 3)
    assert op(-1) == ("torch", -1)


def test_named_backend_that_refuses_raises_with_reasons(monkeypatch):
    monkeypatch.delenv("LAVIN_FAST_BACKEND", raising=False)
    op = _op()
    with pytest.raises(BackendUnavailable, match="x must be positive"):
        op(-1, backend="fast")
    with pytest.raises(BackendUnavailable, match="unknown backend 'cuda'"):
        op(1, backend="cuda")


def test_environment_selects_backend(monkeypatch):
    op = _op()
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "torch")
    assert op(3) == ("torch", 3)
    monkeypatch.setenv("LAVIN_FAST_BACKEND_UNIT_TEST_OP", "fast")
    assert op(3) == ("fast", 3)  # the per-op variable wins over the global one
    with pytest.raises(BackendUnavailable, match="refuses"):
        op(-2)
    assert op(3, backend="torch") == ("torch", 3)  # an explicit argument wins over the environment


def test_explain_lists_reasons(monkeypatch):
    assert _op().explain(-1) == {"fast": ["x must be positive"], "torch": []}


def test_duplicate_backend_names_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        OpDispatcher("dup", [Backend("a", print), Backend("a", print)])


def test_use_backend_is_scoped_thread_local_and_beats_the_environment(monkeypatch):
    import threading

    from lavin_fast.ops.dispatch import use_backend

    op = _op()
    monkeypatch.setenv("LAVIN_FAST_BACKEND", "fast")
    seen = {}

    def other_thread():
        seen["other"] = op(3)  # this thread has no scope: the environment applies

    with use_backend("torch", op="unit_test_op"):
        assert op(3) == ("torch", 3)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        with use_backend("fast"):  # innermost wins, all ops
            assert op(3) == ("fast", 3)
            with pytest.raises(BackendUnavailable, match="refuses"):  # scoped counts as asked by name
                op(-1)
        assert op(3, backend="fast") == ("fast", 3)  # an explicit argument wins over the scope
    assert seen["other"] == ("fast", 3)
    assert op(3) == ("fast", 3)  # the scope ended
    with use_backend("auto", op="unit_test_op"):
        assert op(-1) == ("torch", -1)
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        with use_backend("torch", op="no_such_op"):
            pass
    with pytest.raises(ValueError, match="has no backend 'cuda'"):
        with use_backend("cuda", op="unit_test_op"):
            pass
