"""The progress bar: plain lines (none for short work) off a terminal, counts steps and tokens on one."""

import io

from distattr.viz import progress


def test_quiet_when_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    bar = progress.progress_factory("x")(10)
    bar(10, 100)
    bar.close()
    assert bar.mode == "lines" and stream.getvalue() == ""  # shorter than the log interval: nothing


def test_counts_steps_and_tokens_on_a_terminal(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(progress.sys, "stderr", FakeTTY())
    bar = progress.progress_factory("Attributing")(10)
    bar(4, 400)
    bar(6, 600)
    assert bar.mode == "bar" and bar.n == 10 and bar.total == 10 and bar.tokens == 1000
    assert bar.line().endswith("tok/s]")
    bar.close()


def test_attribute_reports_progress(tiny):
    seen = []

    def factory(total):
        seen.append(("total", total))
        return lambda steps, tokens: seen.append((steps, tokens))

    from distattr import engine
    from distattr.options import AttributeOptions

    m = tiny("gpt2", "integrated_gradients", n_steps=3)
    cfg = AttributeOptions(method="integrated_gradients", method_args={"n_steps": 3}, token_budget=40)
    inputs = engine.Inputs.of(["the cat is", "a dog"], ["the cat is in paris", "a dog said that"])
    engine.attribute(m.loaded, m.adapter, inputs, cfg, progress=factory)
    assert seen[0] == ("total", 2 + 2)
    assert sum(s for s, _ in seen[1:]) == 4 and all(t > 0 for _, t in seen[1:])
