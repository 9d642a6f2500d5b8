"""Code the tests share: tiny models and data, multi-process runs, file audits."""
