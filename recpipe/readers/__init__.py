"""Raw file readers: one fast parser per source file layout.

Rating parsers return a pyarrow Table with the columns of the stage-10 contract
(``raw_user_id``, ``raw_item_id``, ``rating`` float32, optional ``timestamp`` int64 Unix
seconds), or None when they streamed their chunks to a sink; title parsers return
``raw_item_id``, ``title``, ``year``. :mod:`recpipe.formats` puts them behind one registry
whose entries all return one :class:`RawRatings`. Stage 30's held-out files (a Netflix
probe.txt, the NCF test files) are read here too.

* :mod:`.text`: bytes and text, the fast parse, the slow line checks (file:line errors)
* :mod:`.netflix`: per-movie and combined_data files, movie_titles.txt, probe.txt
* :mod:`.movielens`: u.data, ratings.dat, ratings.csv and their item files
* :mod:`.anime`: Kaggle rating.csv and anime.csv
* :mod:`.ncf`: NCF ``.train.rating`` and the ``.test.rating`` / ``.test.negative`` pair
* :mod:`.generic`: any CSV/TSV
"""
from .anime import read_anime, read_anime_items
from .generic import read_generic, sniff_sep
from .movielens import (read_ml100k, read_ml100k_items, read_ml_csv, read_ml_csv_movies,
                        read_ml_dat, read_ml_dat_movies)
from .ncf import read_ncf, read_ncf_test
from .netflix import (NETFLIX_LINE, read_netflix_combined, read_netflix_files,
                      read_netflix_titles, read_probe)
from .text import (LineSpec, RawRatings, Segment, check_range, check_text, decode_text,
                   first_line, head_bytes, load_bytes, text_lines)

__all__ = [
    "LineSpec", "NETFLIX_LINE", "RawRatings", "Segment", "check_range", "check_text",
    "decode_text", "first_line", "head_bytes", "load_bytes", "read_anime", "read_anime_items",
    "read_generic", "read_ml100k", "read_ml100k_items", "read_ml_csv", "read_ml_csv_movies",
    "read_ml_dat", "read_ml_dat_movies", "read_ncf", "read_ncf_test", "read_netflix_combined",
    "read_netflix_files", "read_netflix_titles", "read_probe", "sniff_sep", "text_lines",
]
