"""A griffe extension for the API reference: our docstrings cross-reference with
Sphinx roles (:func:`~sfedlora.api.run`), which mkdocstrings would print literally;
this turns each into inline code of the name as a reader would write it. Written here
because no maintained griffe extension does this one substitution."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")


def _plain(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_plain, obj.docstring.value).replace("``", "`")
