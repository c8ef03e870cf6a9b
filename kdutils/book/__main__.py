"""``python -m kdutils.book CHAPTER --name value ...``: a chapter's recipe (:mod:`kdutils.book.cli`)."""
import sys

from .cli import main

main(sys.argv[1:])
