"""The progress bar: quiet off a terminal, counts steps and tokens on one."""

import io

from distattr.viz import progress


def test_quiet_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    assert progress.progress_factory("x")(10) is None


def test_counts_steps_and_tokens_on_a_terminal(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(progress.sys, "stderr", FakeTTY())
    bar = progress.progress_factory("Attributing")(10)
    bar(4, 400)
    bar(6, 600)
    task = bar._progress.tasks[0]
    assert task.completed == 10 and task.total == 10
    assert task.fields["rate"].endswith("tok/s")
    bar.close()


def test_attribute_reports_progress(tiny):
    seen = []

    def factory(total):
        seen.append(("total", total))
        return lambda steps, tokens: seen.append((steps, tokens))

    from distattr import engine

    m = tiny("gpt2", "integrated_gradients", n_steps=3)
    cfg = engine.AttributeConfig(method="integrated_gradients", method_args={"n_steps": 3}, token_budget=40)
    engine.attribute(m.loaded, m.adapter, ["the cat is", "a dog"], ["the cat is in paris", "a dog said that"], cfg,
                     progress=factory)
    assert seen[0] == ("total", 2 + 2)
    assert sum(s for s, _ in seen[1:]) == 4 and all(t > 0 for _, t in seen[1:])
