"""What a chapter notebook needs besides training: the code it shows and the numbers its
prose quotes (chapter 1 on). Nothing here trains or plots."""
from __future__ import annotations

import inspect


def show_code(*objects) -> "object":
    """Display the source of kdutils functions or classes in a notebook, as a code block.

    The chapters use it so that the method under study is visible where it is discussed,
    while the code itself lives once, in the package.
    """
    from IPython.display import Markdown
    src = "\n\n".join(inspect.getsource(o).rstrip() for o in objects)
    return Markdown(f"```python\n{src}\n```")


def glue(name: str, value, display: bool = False):
    """Store ``value`` for the book's prose (myst-nb ``glue``); a no-op where myst-nb is absent.

    In a chapter's text, ``{glue:text}`name:.2f``` then shows the number of the run that
    produced the committed outputs, never a number typed by hand.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:  # e.g. on Colab: the prose is read in the rendered book anyway
        return
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalars: glue formats plain Python numbers only
    _glue(name, value, display=display)
