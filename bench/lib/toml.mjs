// A small TOML reader: enough of TOML 1.0 for wrangler.toml (tables, arrays of tables, dotted keys, strings,
// numbers, booleans, arrays, inline tables). Dates are kept as strings. It throws on what it does not understand
// rather than guessing, so a wrangler.toml the bench cannot read fails loudly.

export function parseToml(text) {
  const root = {};
  let current = root;
  let i = 0;

  const fail = (message) => {
    const line = text.slice(0, i).split('\n').length;
    throw new Error(`wrangler.toml line ${line}: ${message}`);
  };
  const skipSpaces = () => {
    while (text[i] === ' ' || text[i] === '\t') i++;
  };
  const skipComment = () => {
    if (text[i] === '#') while (i < text.length && text[i] !== '\n') i++;
  };
  // Whitespace, newlines and comments (inside arrays and between statements).
  const skipAll = () => {
    for (;;) {
      skipSpaces();
      skipComment();
      if (text[i] === '\n' || text[i] === '\r') i++;
      else return;
    }
  };
  const endOfLine = () => {
    skipSpaces();
    skipComment();
    if (i < text.length && text[i] !== '\n' && text[i] !== '\r') fail(`unexpected '${text[i]}'`);
  };

  const ESCAPES = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', '"': '"', '\\': '\\' };
  function basicString(multiline) {
    let out = '';
    const close = multiline ? '"""' : '"';
    if (multiline && text[i] === '\n') i++;
    while (i < text.length && !text.startsWith(close, i)) {
      const c = text[i++];
      if (!multiline && c === '\n') fail('newline in string');
      if (c !== '\\') {
        out += c;
        continue;
      }
      const e = text[i++];
      if (e in ESCAPES) out += ESCAPES[e];
      else if (e === 'u' || e === 'U') {
        const len = e === 'u' ? 4 : 8;
        out += String.fromCodePoint(parseInt(text.slice(i, i + len), 16));
        i += len;
      } else if (multiline && (e === '\n' || e === ' ' || e === '\r')) {
        while (/\s/.test(text[i] ?? '')) i++;
      } else fail(`bad escape \\${e}`);
    }
    if (!text.startsWith(close, i)) fail('unterminated string');
    i += close.length;
    return out;
  }
  function literalString(multiline) {
    const close = multiline ? "'''" : "'";
    if (multiline && text[i] === '\n') i++;
    const end = text.indexOf(close, i);
    if (end < 0) fail('unterminated string');
    const out = text.slice(i, end);
    i = end + close.length;
    return out;
  }

  function key() {
    const parts = [];
    for (;;) {
      skipSpaces();
      if (text[i] === '"') {
        i++;
        parts.push(basicString(false));
      } else if (text[i] === "'") {
        i++;
        parts.push(literalString(false));
      } else {
        const m = /^[A-Za-z0-9_-]+/.exec(text.slice(i, i + 256));
        if (!m) fail('expected a key');
        parts.push(m[0]);
        i += m[0].length;
      }
      skipSpaces();
      if (text[i] !== '.') return parts;
      i++;
    }
  }

  function value() {
    skipSpaces();
    if (text.startsWith('"""', i)) return (i += 3), basicString(true);
    if (text.startsWith("'''", i)) return (i += 3), literalString(true);
    if (text[i] === '"') return i++, basicString(false);
    if (text[i] === "'") return i++, literalString(false);
    if (text[i] === '[') {
      i++;
      const list = [];
      for (;;) {
        skipAll();
        if (text[i] === ']') return i++, list;
        list.push(value());
        skipAll();
        if (text[i] === ',') i++;
        else if (text[i] !== ']') fail("expected ',' or ']'");
      }
    }
    if (text[i] === '{') {
      i++;
      const table = {};
      skipSpaces();
      if (text[i] === '}') return i++, table;
      for (;;) {
        const k = key();
        if (text[i++] !== '=') fail("expected '='");
        assign(table, k, value());
        skipSpaces();
        if (text[i] === '}') return i++, table;
        if (text[i++] !== ',') fail("expected ',' or '}'");
      }
    }
    const m = /^[^\s,\]}#]+/.exec(text.slice(i, i + 256));
    if (!m) fail('expected a value');
    i += m[0].length;
    const raw = m[0];
    if (raw === 'true') return true;
    if (raw === 'false') return false;
    if (/^[+-]?(inf|nan)$/.test(raw)) return Number(raw.replace('inf', 'Infinity').replace('nan', 'NaN'));
    const numeric = raw.replaceAll('_', '');
    if (/^[+-]?(0x[0-9a-f]+|0o[0-7]+|0b[01]+)$/i.test(numeric)) return Number(numeric.replace(/^\+/, ''));
    if (/^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$/.test(numeric)) return Number(numeric);
    if (/^\d{4}-\d{2}-\d{2}/.test(raw) || /^\d{2}:\d{2}/.test(raw)) return raw;
    fail(`cannot read value '${raw}'`);
  }

  function descend(table, parts, { arrayLast = false } = {}) {
    let t = table;
    parts.forEach((part, n) => {
      const last = n === parts.length - 1;
      if (last && arrayLast) {
        if (t[part] === undefined) t[part] = [];
        if (!Array.isArray(t[part])) fail(`${parts.join('.')} is not an array of tables`);
        t[part].push({});
        t = t[part].at(-1);
        return;
      }
      if (t[part] === undefined) t[part] = {};
      t = Array.isArray(t[part]) ? t[part].at(-1) : t[part];
      if (typeof t !== 'object' || t === null) fail(`${parts.slice(0, n + 1).join('.')} is not a table`);
    });
    return t;
  }

  function assign(table, parts, v) {
    const parent = descend(table, parts.slice(0, -1));
    const last = parts.at(-1);
    if (Object.hasOwn(parent, last)) fail(`duplicate key ${parts.join('.')}`);
    parent[last] = v;
  }

  for (;;) {
    skipAll();
    if (i >= text.length) break;
    if (text.startsWith('[[', i)) {
      i += 2;
      const parts = key();
      if (!text.startsWith(']]', i)) fail("expected ']]'");
      i += 2;
      current = descend(root, parts, { arrayLast: true });
    } else if (text[i] === '[') {
      i++;
      const parts = key();
      if (text[i++] !== ']') fail("expected ']'");
      current = descend(root, parts);
    } else {
      const parts = key();
      if (text[i++] !== '=') fail("expected '='");
      assign(current, parts, value());
    }
    endOfLine();
  }
  return root;
}
