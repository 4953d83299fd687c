"""The malformed-file corpus (tests/data/corpus/, regenerate with make_corpus.py): every file breaks one rule the
way real exports do, and gets ONE clear message whose first line is pinned here exactly. No message -- local or
public (federation.errors.public_reason, what a node may send) -- contains a planted value."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from federation.contract import load_contract
from federation.errors import ConfigError, DataValidationError, public_reason
from federation.validation import read_validated

CORPUS = Path(__file__).resolve().parent / "corpus"
# planted in the corpus: customer ids ZQ-SECRET-nnn, cells SECRETVALn, and a few ordinary cells
PLANTED = re.compile(r"ZQ-SECRET|SECRETVAL|EUR|1'234|31/12/2023|2031-05|\$7\.25|b\xe4sic|9999|-5\.50")

# (file, contract or None for a contract file, exact first line of the first problem)
CASES = [
    ('age_missing.csv', 'table.yaml',
     "column 'age': 1 row(s) are missing (NaN) (line 5); impute in the export or declare `fill:` for this feature in the contract"),
    ('age_out_of_bounds.csv', 'table_strict.yaml',
     "column 'age': 2 row(s) are outside the declared bounds [0, 120] (lines 3, 5); the encoding clips them to the bound; widen the contract's bounds (from public domain knowledge) or repair the values"),
    ('contract_bad_yaml.yaml', None,
     "contract file '<corpus>/contract_bad_yaml.yaml' is not valid YAML: while parsing a flow node"),
    ('contract_bound_nan.yaml', None,
     "contract file '<corpus>/contract_bound_nan.yaml': contract 'corpus_table': features[0] (age): bounds must be finite numbers, got lo=nan, hi=120.0 (a non-finite bound encodes every value to the same number, so the feature carries nothing): declare a public domain bound"),
    ('contract_bound_text.yaml', None,
     "contract file '<corpus>/contract_bound_text.yaml': features[0].lo='zero' must be a number"),
    ('contract_checks_bad_level.yaml', None,
     "contract file '<corpus>/contract_checks_bad_level.yaml': checks.out_of_vocabulary='warn': use one of note, error"),
    ('contract_cutoff_feb30.yaml', None,
     "contract file '<corpus>/contract_cutoff_feb30.yaml': contract 'corpus_events': events.cutoff='2024-02-30' is not a valid date (write YYYY-MM-DD, a real calendar day): fix the contract or the data config, not the data"),
    ('contract_cutoff_not_a_date.yaml', None,
     "contract file '<corpus>/contract_cutoff_not_a_date.yaml': contract 'corpus_events': events.cutoff='next monday' is not a valid date (write YYYY-MM-DD, a real calendar day): fix the contract or the data config, not the data"),
    ('contract_event_bound_inf.yaml', None,
     "contract file '<corpus>/contract_event_bound_inf.yaml': contract 'corpus_events': events.feature_bounds.monetary: bounds must be finite numbers, got lo=0.0, hi=inf (a non-finite bound encodes every value to the same number, so the feature carries nothing): declare a public domain bound"),
    ('contract_fill_outside_bounds.yaml', None,
     "contract file '<corpus>/contract_fill_outside_bounds.yaml': contract 'corpus_table': features[0] (age): fill=-1.0 is outside [lo, hi] = [0.0, 120.0]"),
    ('contract_hi_inf.yaml', None,
     "contract file '<corpus>/contract_hi_inf.yaml': contract 'corpus_table': features[0] (spend): bounds must be finite numbers, got lo=0.0, hi=inf (a non-finite bound encodes every value to the same number, so the feature carries nothing): declare a public domain bound"),
    ('contract_hi_not_above_lo.yaml', None,
     "contract file '<corpus>/contract_hi_not_above_lo.yaml': features[0]: need hi > lo (declared bounds), got lo=120.0, hi=0.0"),
    ('contract_lo_minus_inf.yaml', None,
     "contract file '<corpus>/contract_lo_minus_inf.yaml': contract 'corpus_table': features[0] (age): bounds must be finite numbers, got lo=-inf, hi=120.0 (a non-finite bound encodes every value to the same number, so the feature carries nothing): declare a public domain bound"),
    ('contract_log1p_negative_lo.yaml', None,
     "contract file '<corpus>/contract_log1p_negative_lo.yaml': contract 'corpus_table': features[0] (spend): lo=-50.0 is negative but the transform is log1p (for counts and amounts >= 0): use lo: 0 or transform: identity"),
    ('contract_min_customers_fraction.yaml', None,
     "contract file '<corpus>/contract_min_customers_fraction.yaml': min_customers=2.5 must be an integer"),
    ('contract_min_customers_negative.yaml', None,
     "contract file '<corpus>/contract_min_customers_negative.yaml': contract 'corpus_table': min_customers=-5 must be >= 1 (the fewest customers a partner may train on; the defaults use 100)"),
    ('contract_min_customers_zero.yaml', None,
     "contract file '<corpus>/contract_min_customers_zero.yaml': contract 'corpus_table': min_customers=0 must be >= 1 (the fewest customers a partner may train on; the defaults use 100)"),
    ('contract_unknown_key.yaml', None,
     "contract file '<corpus>/contract_unknown_key.yaml': unknown contract key min_customer; did you mean min_customers?"),
    ('corrupt.csv.gz', 'table.yaml',
     'cannot read csv input (error: Error -3 while decompressing data: invalid block type); the compressed file is corrupt or truncated; copy it again from the source system'),
    ('duplicate_customer.csv', 'table.yaml',
     "column 'cid': 1 customer id(s) appear more than max_rows_per_customer=1 time(s) (repeats at line 9); the privacy unit is the customer, so extra rows would silently weaken the guarantee: deduplicate the export, or raise max_rows_per_customer in the contract (the accounting then uses group privacy of that size)"),
    ('duplicate_rows.csv', 'table.yaml',
     "column 'cid': 1 customer id(s) appear more than max_rows_per_customer=1 time(s) (repeats at lines 14, 15); the privacy unit is the customer, so extra rows would silently weaken the guarantee: deduplicate the export, or raise max_rows_per_customer in the contract (the accounting then uses group privacy of that size)"),
    ('empty_file.csv', 'table.yaml',
     "cannot read csv input (EmptyDataError: No columns to parse from file); the CSV could not be parsed with separator ','; check source.sep, quoting and that every line has the header's number of fields"),
    ('events_amount_not_number.csv', 'events.yaml',
     "column 'amount': 1 row(s) are not numbers (line 6); amounts must be plain numbers (no currency symbols or thousands separators; a decimal comma needs source.decimal: ',')"),
    ('events_bad_timestamp.csv', 'events.yaml',
     "column 'ts': 1 row(s) cannot be parsed as timestamps (or are impossible dates) (line 5); use ISO 8601 (YYYY-MM-DD HH:MM:SS), real calendar days between 1678 and 2261, or declare columns.timestamp_format"),
    ('events_day_first.csv', 'events.yaml',
     "column 'ts': 2 row(s) cannot be parsed as timestamps (or are impossible dates) (lines 2, 6); use ISO 8601 (YYYY-MM-DD HH:MM:SS), real calendar days between 1678 and 2261, or declare columns.timestamp_format"),
    ('events_everyone_returns.csv', 'events.yaml',
     'label churn has no positives at this cutoff (every customer is active in the horizon); check events.activity or the cutoff'),
    ('events_future.csv', 'events.yaml',
     "column 'ts': 1 row(s) are in the future (after 2026-01-01 00:00) (line 4); future events are clock or time-zone errors and would leak into labels; fix the source clock or the time zone of the export"),
    ('events_impossible_date.csv', 'events.yaml',
     "column 'ts': 1 row(s) cannot be parsed as timestamps (or are impossible dates) (line 3); use ISO 8601 (YYYY-MM-DD HH:MM:SS), real calendar days between 1678 and 2261, or declare columns.timestamp_format"),
    ('events_log_ends_early.csv', 'events.yaml',
     "column 'ts': the log ends about 17 day(s) before the label horizon ends (2024-01-31); labels would overstate churn: move events.cutoff earlier or shorten events.horizon_days"),
    ('events_missing_customer.csv', 'events.yaml',
     "column 'cid': 1 row(s) have no customer id (line 2); every row must belong to a customer (the privacy unit); fix the export or set events.drop_missing_customer in the contract"),
    ('events_missing_timestamp.csv', 'events.yaml',
     "column 'ts': 1 row(s) have no timestamp (line 8); every event needs a time; drop or repair these rows in the export"),
    ('events_mixed_timezones.csv', 'events.yaml',
     "column 'ts': mixed time zones: 2 row(s) carry a UTC offset (lines 4, 7) and 14 do not; export every timestamp in one zone (UTC, or all with an offset): a time without a zone cannot be ordered against one with a zone"),
    ('events_negative_purchase.csv', 'events.yaml',
     "column 'amount': 1 row(s) are purchases with a negative amount (line 3); refunds must be separate return events; fix the sign or the event type"),
    ('events_no_horizon.csv', 'events.yaml',
     "column 'ts': no events in the label horizon [2024-01-01, 2024-01-31) (the log ends before it); every customer would count as churned: move events.cutoff earlier or export more recent data"),
    ('events_too_few_customers.csv', 'events.yaml',
     "only 2 customer(s), fewer than the contract's min_customers=3: with n customers, delta must be well below 1/n (delta is the probability that the guarantee fails for someone), and the DP-SGD noise, calibrated to one customer, swamps the signal of a small table. Pool more history, join a larger partner group, or leave this partner out of DP training"),
    ('events_ts_as_int.parquet', 'events.yaml',
     "column 'ts' is stored as Parquet type int64, but the contract declares a timestamp (or ISO 8601 text); write the column with that type in the export (or as text) and export again"),
    ('events_year_9999.parquet', 'events.yaml',
     "column 'ts': 1 row(s) cannot be parsed as timestamps (or are impossible dates) (row 2); use ISO 8601 (YYYY-MM-DD HH:MM:SS), real calendar days between 1678 and 2261, or declare columns.timestamp_format"),
    ('header_only.csv', 'table.yaml',
     "the input has no usable rows; check the file and the contract's filters"),
    ('label_not_binary.csv', 'table.yaml',
     "column 'churned': 2 row(s) have a label that is neither positive ['1'] nor negative ['0'] (lines 3, 10); labels must be binary; map the other values in the export or declare them in label.*"),
    ('missing_column.csv', 'table.yaml',
     "column 'spend' is required by the contract but absent; available columns: cid, age, plan, churned. Rename the column in the export or fix the contract's column mapping."),
    ('missing_customer_id.csv', 'table.yaml',
     "column 'cid': 1 row(s) have no customer id (line 7); every row must belong to a customer (the privacy unit); fix the export or set events.drop_missing_customer in the contract"),
    ('missing_field.csv', 'table.yaml',
     "2 line(s) have fewer fields than the header's 5 (lines 3, 6); an unquoted separator inside a value (e.g. a decimal comma) or a truncated line shifts the columns: quote such values in the export or fix those lines"),
    ('misspelled_column.csv', 'table.yaml',
     "column 'age' is required by the contract but absent; did you mean 'Age'? Rename the column in the export or fix the contract's column mapping."),
    ('no_negatives.csv', 'table.yaml',
     "column 'churned': every row is positive; check label.negative or the export's filter"),
    ('no_positives.csv', 'table.yaml',
     "column 'churned': the label has no positive rows (positive values ['1']); a model cannot learn churn without positives: check label.positive in the contract or the export's filter"),
    ('not_parquet.parquet', 'table.yaml',
     'cannot read parquet input (ArrowInvalid: Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.); the Parquet file could not be read; it may be truncated or not Parquet at all'),
    ('not_utf8.csv', 'table.yaml',
     'cannot read csv input (UnicodeDecodeError: a byte at position 134 is not valid utf-8); the file is not utf-8-encoded text; set source.encoding in the contract'),
    ('plan_out_of_vocabulary.csv', 'table_strict.yaml',
     "column 'plan': 2 row(s) have a value outside the declared vocabulary (lines 4, 11); they are encoded as __other__; add legitimate values to the contract's vocabulary (or map them in the export)"),
    ('sep_pipe.csv', 'table.yaml',
     "the file is separated by '|', not ',': with '|' the header has 5 of the contract's 5 columns; set source.sep: '|' in the contract (or export with the contract's separator)"),
    ('sep_semicolon.csv', 'table.yaml',
     "the file is separated by ';', not ',': with ';' the header has 5 of the contract's 5 columns; set source.sep: ';' in the contract (or export with the contract's separator)"),
    ('sep_tab.csv', 'table.yaml',
     "the file is separated by '\\t', not ',': with '\\t' the header has 5 of the contract's 5 columns; set source.sep: '\\t' in the contract (or export with the contract's separator)"),
    ('spend_as_timestamp.parquet', 'table.yaml',
     "column 'spend' is stored as Parquet type timestamp[us], but the contract declares a number; write the column with that type in the export (or as text) and export again"),
    ('spend_infinite.csv', 'table.yaml',
     "column 'spend': 1 row(s) are infinite (line 6); repair these values"),
    ('spend_not_number.csv', 'table.yaml',
     "column 'spend': 2 row(s) are not numbers (wrong dtype) (lines 4, 8); the contract declares this column numeric; repair the values or declare it categorical (numbers written with a decimal comma need source.decimal: ','); a missing value written as a marker such as '?' or '-' must be left blank in the export (blank, NA, N/A and NULL are read as missing and get the feature's fill)"),
    ('too_few_customers.csv', 'table.yaml',
     "only 3 customer(s), fewer than the contract's min_customers=5: with n customers, delta must be well below 1/n (delta is the probability that the guarantee fails for someone), and the DP-SGD noise, calibrated to one customer, swamps the signal of a small table. Pool more history, join a larger partner group, or leave this partner out of DP training"),
    ('truncated.csv.gz', 'table.yaml',
     'cannot read csv input (EOFError: Compressed file ended before the end-of-stream marker was reached); the compressed file is corrupt or truncated; copy it again from the source system'),
    ('truncated.parquet', 'table.yaml',
     'cannot read parquet input (ArrowInvalid: Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.); the Parquet file could not be read; it may be truncated or not Parquet at all'),
    ('unquoted_decimal_comma.csv', 'table.yaml',
     "3 line(s) have more fields than the header's 5 (lines 4, 7, 9); an unquoted separator inside a value (e.g. a decimal comma) or a truncated line shifts the columns: quote such values in the export or fix those lines"),
]


def _message(name: str, contract: str | None) -> tuple[str, BaseException]:
    path = CORPUS / name
    if contract is None:
        with pytest.raises(ConfigError) as e:
            load_contract(str(path))
        return str(e.value), e.value
    with pytest.raises(DataValidationError) as e:
        read_validated(load_contract(str(CORPUS / contract)), str(path), now="2026-01-01")
    return str(e.value), e.value


def test_corpus_is_large_and_fully_pinned():
    files = {p.name for p in CORPUS.iterdir()} - {"make_corpus.py", "table.yaml", "table_strict.yaml", "events.yaml"}
    files = {f for f in files if not f.startswith("good_")}
    assert len(CASES) >= 40
    assert files == {name for name, _, _ in CASES}, "every corpus file has a pinned message"


@pytest.mark.parametrize("name,contract,first", CASES, ids=[c[0] for c in CASES])
def test_first_line_is_pinned(name, contract, first):
    text, exc = _message(name, contract)
    line = (exc.problems[0] if isinstance(exc, DataValidationError) else text).splitlines()[0]
    assert line.replace(str(CORPUS), "<corpus>") == first
    assert "Traceback" not in text
    # the whole local message names rows and columns, never a planted value
    body = text.replace(str(CORPUS / name), "<file>")  # the file's own name may hold a planted string
    assert not PLANTED.search(body), PLANTED.search(body)
    # what may leave the node: a category, codes, column names or keys; no counts (raw counts are no DP release)
    public = public_reason(exc)
    assert not PLANTED.search(public) and str(CORPUS) not in public and "\n" not in public
    assert "rows=" not in public and not re.search(r"=\d", public)
    assert public.startswith("data_validation_failed: " if contract else "config_error")


@pytest.mark.parametrize("name", ["good_table.csv", "good_table.parquet", "good_events.csv"])
def test_good_files_pass(name):
    contract = "events.yaml" if "events" in name else "table.yaml"
    v = read_validated(load_contract(str(CORPUS / contract)), str(CORPUS / name), now="2026-01-01")
    assert v.report.customers >= 6 and not v.report.notes


def test_out_of_vocabulary_and_bounds_are_notes_by_default():
    c = load_contract(str(CORPUS / "table.yaml"))
    oov = read_validated(c, str(CORPUS / "plan_out_of_vocabulary.csv")).report.notes
    assert oov == ["column 'plan': 2 row(s) have a value outside the declared vocabulary (lines 4, 11); they are "
                   "encoded as __other__; add legitimate values to the contract's vocabulary (or map them in the "
                   "export) (checks.out_of_vocabulary: error makes this an error)"]
    oob = read_validated(c, str(CORPUS / "age_out_of_bounds.csv")).report.notes
    assert len(oob) == 1 and oob[0].startswith("column 'age': 2 row(s) are outside the declared bounds [0, 120] (lines 3, 5)")


def test_duplicate_rows_without_ids_are_a_note_with_count_and_lines(tmp_path):
    import yaml

    spec = yaml.safe_load((CORPUS / "table.yaml").read_text())
    spec["columns"]["customer_id"] = ""
    (tmp_path / "noid.yaml").write_text(yaml.safe_dump(spec))
    notes = read_validated(load_contract(str(tmp_path / "noid.yaml")), str(CORPUS / "duplicate_rows.csv")).report.notes
    assert [n for n in notes if "repeat an earlier row" in n] == [
        "2 row(s) repeat an earlier row in every column the contract reads (lines 14, 15); kept: distinct customers "
        "can share every attribute, but a line repeated by the export counts one customer twice; if the export "
        "repeats lines, set deduplicate: true in the contract"]
    spec["deduplicate"] = True
    (tmp_path / "dedup.yaml").write_text(yaml.safe_dump(spec))
    v = read_validated(load_contract(str(tmp_path / "dedup.yaml")), str(CORPUS / "duplicate_rows.csv"))
    assert v.report.customers == 12 and v.report.notes == ["2 exact duplicate rows dropped (the contract declares deduplicate: true)"]


def test_rows_without_ids_are_named_by_their_source_row_and_scoring_keeps_label_only_twins(tmp_path):
    """A table without an id column: a customer is its data row, so ids stay the source's row numbers after
    deduplication drops a row before them (they were positions in the deduplicated frame: "row-1" was then the
    customer on data row 2). Scoring reads no label, so two rows equal in every other column are two customers,
    both scored."""
    import yaml

    from federation.contract import build_features

    spec = yaml.safe_load((CORPUS / "table.yaml").read_text())
    spec["columns"]["customer_id"] = ""
    spec["deduplicate"] = True
    (tmp_path / "dedup.yaml").write_text(yaml.safe_dump(spec))
    c = load_contract(str(tmp_path / "dedup.yaml"))
    lines = [r.split(",", 1)[1] for r in (CORPUS / "duplicate_rows.csv").read_text().splitlines()[:13]]  # no ids
    header, data = lines[0], lines[1:]  # 12 distinct rows
    flipped = data[1][:-1] + ("0" if data[1].endswith("1") else "1")  # data row 1's twin but for the label
    rows = [data[0], data[0], data[1], flipped] + data[2:]  # data row 1 repeats row 0; row 3 is row 2's twin
    (tmp_path / "t.csv").write_text("\n".join([header] + rows) + "\n")
    fs = build_features(read_validated(c, str(tmp_path / "t.csv")).frame, c)
    assert list(fs.customer_ids) == ["row-0"] + [f"row-{i}" for i in range(2, 14)]
    s = read_validated(c, str(tmp_path / "t.csv"), labels=False)  # scoring: rows 0 and 1 equal, 2 and 3 equal now
    assert list(s.frame.index) == list(range(14)) and any("each is scored" in n for n in s.report.notes)


def test_public_reason_of_other_exceptions_carries_no_text():
    secret = "ZQ-SECRET-777"
    assert public_reason(KeyError(secret)) == "internal_error: KeyError (details in the node's local log)"
    assert public_reason(ValueError(f"bad row {secret}")).startswith("internal_error: ValueError")
    r = public_reason(ConfigError(f"privacy.epsilon=inf must be finite; node data-path='/data/{secret}.csv'"))
    assert r == "config_error: keys data-path, privacy.epsilon"
    assert secret not in r
