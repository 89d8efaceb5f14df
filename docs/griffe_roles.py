"""Griffe extension for the API pages: the docstrings use Sphinx roles (``:func:`distattr.load` ``,
``:class:`~distattr.results.AttributionOutput` ``), which Markdown would print as they are; this turns each one
into a code span (``~`` keeps the last name only, as Sphinx does). Listed under the python handler's
``extensions`` in ``mkdocs.yml``."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def plain(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(plain, obj.docstring.value)
