"""The one line of another library's exception that this package's one-line errors quote."""


def first_line(error):
  """The first non-blank line of str(error); the exception's type name when it has none (str(KeyError()) is '')."""
  return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
