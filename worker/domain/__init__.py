"""The order domain, pure: state machine, duplicate-submission rules, what applying came to.

No I/O here: everything is decided from values, so it is tested without servers
(tests/unit/test_domain.py, test_submissions.py).
"""
