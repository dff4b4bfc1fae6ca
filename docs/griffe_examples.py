"""A griffe extension for the API reference: Google-style ``Example:`` sections render as code.

griffe parses ``Examples:`` (plural) as an examples section, whose ``>>>`` lines become highlighted code
blocks, but reads the singular ``Example:``, which both packages use, as a plain admonition, where ``>>>``
would render as nested block quotes. Renaming the heading before the docstring is parsed fixes that without
touching the sources.
"""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrites ``Example:`` headings to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
