"""MkDocs hooks (``mkdocs.yml``: ``hooks``): the docstrings' own conventions, rendered as Markdown.

deepmetric's docstrings are read in three places: ``help()``, ``doctest`` (the worked examples are
tests) and the API reference built by mkdocstrings. Written for the first two, they hold doctests
without fences and Sphinx roles (``:func:`~deepmetric.x.f```). This hook adds one Markdown
preprocessor, to every page and every docstring:

- a run of doctest lines (``>>>``, ``...`` and the output up to a blank line) becomes a ``pycon``
  code block, so an example keeps its lines (and ``[a]`` then ``[b]`` on the next line is not read as
  a Markdown reference link);
- a Sphinx role becomes a code span of its target (``~`` keeps the last name only, as Sphinx does);
- a line ending in the reST literal marker ``::`` ends in ``:`` (the indented block after it is a
  code block in Markdown already).

Lines inside fenced code blocks are left alone.
"""
from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")
FENCE = re.compile(r"^\s*(```|~~~)")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if "<" in target and target.endswith(">"):  # :func:`text <target>`
        return f"`{target.split('<')[0].strip()}`"
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class DocstringMarkdown(Preprocessor):
    def run(self, lines):
        out, fence, doctest = [], None, None
        for line in lines:
            stripped = line.lstrip()
            if fence is None and doctest is None and FENCE.match(line):
                fence = FENCE.match(line).group(1)
                out.append(line)
                continue
            if fence is not None:
                if stripped.startswith(fence):
                    fence = None
                out.append(line)
                continue
            if doctest is not None:
                if stripped:
                    out.append(line[len(doctest):] if line.startswith(doctest) else stripped)
                    continue
                out.append(doctest + "```")
                doctest = None
            if stripped.startswith(">>> ") or stripped == ">>>":
                doctest = line[: len(line) - len(stripped)]
                out += ["", doctest + "```pycon", stripped]
                continue
            line = ROLE.sub(_role, line)
            if line.endswith("::") and not line.endswith(":::") and stripped != "::":
                line = line[:-1]
            out.append(line)
        if doctest is not None:
            out.append(doctest + "```")
        return out


class DocstringExtension(Extension):
    def extendMarkdown(self, md):  # noqa: N802 (Python-Markdown's name)
        md.preprocessors.register(DocstringMarkdown(md), "deepmetric_docstrings", 40)


@event_priority(100)  # before mkdocstrings reads the extension list
def on_config(config):
    config.markdown_extensions.append(DocstringExtension())
    return config
