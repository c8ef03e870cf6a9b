"""What a chapter notebook needs besides training: its first lines, the code it shows and the
numbers its prose quotes (chapter 1 on). Nothing here trains or plots."""
from __future__ import annotations

import inspect
import json

from .. import results, train
from . import audit, chapters, params, recipes


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


def glue_stat(name: str, statistic: str, arm, baseline=None) -> float:
    """Glue ``statistic`` of the runs ``arm`` (records as a frame, e.g. from
    :func:`kdutils.results.to_frame`), against ``baseline`` for a paired one, together with the
    run keys it came from, so that :func:`kdutils.book.audit.audit_page` can recompute it from
    the records later. Returns the value. Statistics: ``kdutils.book.audit.STATS``."""
    value = audit.stat(statistic, arm, baseline)
    glue(name, value)
    glue(name + audit.SUFFIX, json.dumps({"stat": statistic, **audit.sources(arm, baseline)}))
    return value


def setup(namespace: dict, chapter: str, box: str | None = None):
    """A chapter's first lines: check its parameters, load its images, say what runs where.

    ``namespace`` is the notebook's ``globals()``, holding its parameter cell as papermill
    may have overridden it. Returns ``(P, data)``: the checked parameters and the images of
    :func:`kdutils.book.recipes.load_data`. It prints the run's description, the data's source and
    the device, one per line, and every parameter the profile set to another value than the
    parameter cell's (a reduced profile's epochs, say). With ``box``, a glue prefix such as ``"c7"``, it also stores what the page's
    "this run" box quotes: ``{box}_profile``, ``_train_size``, ``_test_size``, ``_device`` and
    ``_profile_says`` (what the profile's numbers can and cannot say).
    """
    P = chapters.from_notebook(namespace, chapter=chapter)
    data = recipes.load_data(P)
    device = results.device_name(train.pick_device(P.device))
    # three short lines: a page shows each whole, where one long line was cut at its margin
    print(f"run:    {params.describe(P)}\ndata:   {data.source}\ndevice: {device}")
    # what the profile changed, so that a page never shows a parameter cell its run did not use
    changed = {k: P[k] for k in P if k in namespace and namespace[k] != P[k]}
    if changed:
        print(f"the {P.profile} profile sets: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    if box is not None:
        glue(f"{box}_profile", P.profile)
        glue(f"{box}_train_size", len(data.train_y))
        glue(f"{box}_test_size", len(data.test_y))
        glue(f"{box}_device", device)
        glue(f"{box}_profile_says", params.profile_note(P.profile))
    return P, data
