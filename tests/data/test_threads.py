"""``in_order``: work on a thread pool, taken in input order, drawing its items in sequence and only a
window ahead; rows made that way keep naming the first bad row."""

import json
import threading
import time

import pytest

from mmsr.data.loaders import DataError, load_samples
from mmsr.data.threads import in_order
from tests.data.test_loaders import _copy_fvqa


def test_results_come_in_input_order_whichever_finishes_first():
    def slow_first(x: int) -> int:
        time.sleep(0.02 * (5 - x))  # item 0 finishes last
        return x * x

    assert [f.result() for f in in_order(slow_first, range(5))] == [0, 1, 4, 9, 16]


def test_items_are_drawn_in_sequence_by_the_caller_at_most_a_window_ahead():
    drawn, ahead, threads = [], [], set()

    def items():
        for i in range(40):
            threads.add(threading.get_ident())
            drawn.append(i)
            yield i

    for taken, future in enumerate(in_order(lambda x: x + 1, items(), window=4)):
        ahead.append(len(drawn) - taken)
        assert future.result() == taken + 1
    assert drawn == list(range(40)) and threads == {threading.get_ident()}
    assert max(ahead) == 4


def test_an_error_of_the_items_comes_after_the_work_before_it():
    def items():
        yield from (1, 2, 3)
        raise ValueError("line 3 is not JSON")

    got = []
    with pytest.raises(ValueError, match="line 3"):
        for future in in_order(lambda x: 10 * x, items()):
            got.append(future.result())
    assert got == [10, 20, 30]


def test_the_first_bad_row_is_named_when_a_later_line_is_not_json(tmp_path):
    """Row 2's image is missing (line 3) and line 7 is not JSON: row by row the image error comes first,
    and it still does with the rows made ahead on the pool."""
    path = _copy_fvqa(tmp_path, lambda rows: rows[2].update(image="images/missing.jpg"))
    lines = path.read_text().splitlines()
    lines[6] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 3, field 'image'"):
        load_samples(path)
    with pytest.raises(DataError, match="line 7, field '<line>': invalid JSON"):
        load_samples(path, skip_invalid=True)  # a line that is not JSON is not a row to skip
    assert json.loads(lines[5])  # the rows before it were fine
