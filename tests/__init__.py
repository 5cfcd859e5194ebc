"""The test suite, a regular package so that ``tests.support`` resolves to this checkout, never to a ``tests``
package some distribution left in site-packages (pytest's ``pythonpath = ["."]`` puts the repository root first)."""
