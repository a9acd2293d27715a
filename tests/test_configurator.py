"""configurator.py: overrides, types, config files, helpful errors."""
import pytest

from configurator import configure, pick_dtype


def fresh():
    return {'batch_size': 12, 'learning_rate': 6e-4, 'compile': False, 'init_from': 'scratch', 'out_dir': 'out',
            'betas': (0.9, 0.95), 'peak': None, '_private': 1, 'MAX_TOKENS': 5}


def test_overrides_are_parsed_as_python_literals():
    g = fresh()
    configure(g, ['--batch_size=32', '--learning_rate=1', '--compile=True', '--init_from=gpt2', '--out_dir=123',
                  '--betas=(0.8, 0.9)', '--peak=3e14'])
    assert g['batch_size'] == 32 and g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)
    assert g['compile'] is True and g['init_from'] == 'gpt2' and g['out_dir'] == '123'
    assert g['betas'] == (0.8, 0.9) and g['peak'] == 3e14
    configure(g, ['--compile=false'])
    assert g['compile'] is False


@pytest.mark.parametrize('arg, message', [
    ('--batch_sise=4', 'did you mean --batch_size'),
    ('--batch_size=4.5', 'expected int'),
    ('--batch_size=True', 'expected int'),
    ('--compile=1', 'expected bool'),
    ('--learning_rate=fast', 'expected float'),
    ('--batch_size', 'write --batch_size=value'),
    ('config/nope.py', 'config file config/nope.py not found'),
])
def test_bad_overrides_stop_with_one_line(arg, message, capsys):
    with pytest.raises(SystemExit) as e:
        configure(fresh(), [arg])
    assert message in str(e.value) and str(e.value).startswith('error: ') and '\n' not in str(e.value)


def test_config_files_set_known_keys_and_are_type_checked(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 64\nlearning_rate = 3e-4\n")
    g = fresh()
    configure(g, [str(cfg), '--batch_size=8'])  # later arguments win
    assert g['batch_size'] == 8 and g['learning_rate'] == 3e-4
    cfg.write_text("batch_sise = 64\n")
    with pytest.raises(SystemExit, match="unknown key 'batch_sise'; did you mean --batch_size"):
        configure(fresh(), [str(cfg)])
    cfg.write_text("compile = 'yes'\n")
    with pytest.raises(SystemExit, match='expected bool'):
        configure(fresh(), [str(cfg)])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        configure(fresh(), ['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and '--batch_size=12' in out and '--learning_rate=0.0006' in out
    assert '_private' not in out and 'MAX_TOKENS' not in out


def test_dtype_choice():
    assert pick_dtype('auto', 'cpu') == 'float32'
    assert pick_dtype('bfloat16', 'cpu') == 'bfloat16'
    with pytest.raises(SystemExit, match='--dtype=fp8'):
        pick_dtype('fp8', 'cpu')
