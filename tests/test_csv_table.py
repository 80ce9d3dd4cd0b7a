"""data_prep.csv_table: the one reader of the tables users give (slide lists, labels, split
files, tile lists) as spreadsheets and clinical exports save them."""
import pytest

from data_prep import csv_table


@pytest.mark.parametrize("text, sep", [
    ("slide_id,label\r\nx,1\r\n", ","),
    ("slide_id\tlabel\tnote, free text\nx\tpos\tsome, words\n", "\t"),
    ("slide_id;label;time, months\nx;1;22,5\n", ";"),
    ('"id, as given",label\nx,1\n', ","),
    ("slide_id\n", ","),
])
def test_the_separator_is_the_one_that_splits_the_header_most(text, sep):
    """A tab or ';' file whose column names hold commas was read as a comma file (columns
    'slide_id\\tlabel\\tnote' and 'free text'). Plant: "any comma in the header means ','" ->
    the tab and ';' cases fail."""
    assert csv_table.separator(text) == sep


def test_rows_of_a_tab_file_with_commas_in_names_and_values(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("\ufeffslide_id \tlabel\tnote, free text\nx\tpos\ta, b\n\t\t\n", encoding="utf-8")
    names, rows = csv_table.read_rows(str(path))
    assert names == ["slide_id", "label", "note, free text"]
    assert rows == [{"slide_id": "x", "label": "pos", "note, free text": "a, b"}]
    assert csv_table.separator_of(str(path)) == "\t"


def test_tables_are_named_csv_tsv_or_txt(tmp_path):
    """Plant: only .csv accepted -> the .tsv slide list was "not a folder or a .csv file"."""
    for name in ("a.csv", "b.TSV", "c.txt"):
        (tmp_path / name).write_text("path\nx.svs\n")
        assert csv_table.is_table(str(tmp_path / name))
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    assert not csv_table.is_table(str(tmp_path / "d.xlsx"))
    assert not csv_table.is_table(str(tmp_path / "missing.csv"))


def test_other_encodings_name_the_file_and_the_byte(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("slide_id,label\nsl\xe9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: not UTF-8 text \(byte 17\)"):
        csv_table.read_rows(str(path))


def test_old_mac_line_ends_are_lines(tmp_path):
    """Excel's "CSV (Macintosh)" ends lines with a bare '\\r'. Plant: the header cut at '\\n'
    only -> csv.Error 'new-line character seen in unquoted field' (a traceback)."""
    path = tmp_path / "labels.csv"
    path.write_bytes(b"slide_id;label\ra;x\rb;y\r")
    assert csv_table.read_rows(str(path)) == (["slide_id", "label"],
                                              [{"slide_id": "a", "label": "x"}, {"slide_id": "b", "label": "y"}])


def test_a_column_named_twice_is_refused(tmp_path):
    """Two 'label' columns (tables merged side by side): a row dict keeps the last one, so the
    labels read would silently be the second column's. Plant: no check -> rows read."""
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,,label\na,x,,y\nb,y,,x\n")
    with pytest.raises(ValueError, match=r"labels.csv: column\(s\) \['label'\] appear more than once"):
        csv_table.read_rows(str(path))


def test_an_unreadable_cell_names_the_file(tmp_path):
    """A cell over the csv module's field size limit (e.g. a binary file saved as .csv). Plant:
    csv.Error not caught -> a traceback."""
    path = tmp_path / "big.csv"
    path.write_text('slide_id,label\na,"' + "x" * 200_000 + '"\n')
    with pytest.raises(ValueError, match=r"big.csv: not a readable CSV \(field larger"):
        csv_table.read_rows(str(path))


@pytest.mark.parametrize("text", ["\nslide_id,label\na,x\n", "\r\n\r\nslide_id,label\r\na,x\r\n",
                                  "sep=;\nslide_id;label\na;x\n", "sep=,\r\n\r\nslide_id,label\r\na,x\r\n"])
def test_blank_lines_and_excel_sep_line_above_the_header(tmp_path, text):
    """A blank first line made the header empty and every row vanish ("no rows"); Excel's
    "sep=;" line was read as the header (missing columns ['', 'sep=']). Plant: no
    _table_text -> both fail."""
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode())
    assert csv_table.read_rows(str(path)) == (["slide_id", "label"], [{"slide_id": "a", "label": "x"}])
    assert csv_table.separator_of(str(path)) == ("," if "," in text else ";")
