"""errors.first_line: what a one-line error quotes from another library's exception."""
import zipfile

from ddpm_jax import errors


def test_the_first_non_blank_line_or_the_type_name():
  assert errors.first_line(ValueError("bad header\nat byte 12")) == "bad header"
  assert errors.first_line(OSError("\n  disk full  \n")) == "disk full"
  # str(KeyError()) and str(EOFError()) are empty: indexing their lines raised IndexError inside the error path.
  assert errors.first_line(KeyError()) == "KeyError"
  assert errors.first_line(EOFError()) == "EOFError"
  assert errors.first_line(zipfile.BadZipFile("File is not a zip file")) == "File is not a zip file"
