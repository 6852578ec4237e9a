"""The ground floor: files that survive a kill (``files``), the registry of every name a config can choose
(``registry``), the reading of judge specs (``judge_spec``), text measures (``text``), where a run's time goes
(``phases``), several processes (``distributed``) and experiment trackers (``trackers``).
May import nothing else of sgpo."""
