// Applying migrations/*.sql through the D1 binding. D1's `exec` is line-oriented, so statements are split here
// (aware of strings, quoted identifiers, comments and trigger bodies) and run as one `batch` (a transaction).

import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

export function splitSql(sql) {
  const statements = [];
  let current = '';
  let i = 0;
  const push = () => {
    const s = current.trim();
    if (s) statements.push(s);
    current = '';
  };
  while (i < sql.length) {
    const c = sql[i];
    if (c === '-' && sql[i + 1] === '-') {
      while (i < sql.length && sql[i] !== '\n') i++;
      continue;
    }
    if (c === '/' && sql[i + 1] === '*') {
      const end = sql.indexOf('*/', i + 2);
      i = end < 0 ? sql.length : end + 2;
      current += ' ';
      continue;
    }
    if (c === "'" || c === '"' || c === '`' || c === '[') {
      const close = c === '[' ? ']' : c;
      let j = i + 1;
      for (;;) {
        if (j >= sql.length) throw new Error('unterminated quote in SQL');
        if (sql[j] === close) {
          if (close !== ']' && sql[j + 1] === close) j += 2; // doubled quote = escaped
          else break;
        } else j++;
      }
      current += sql.slice(i, j + 1);
      i = j + 1;
      continue;
    }
    if (c === ';') {
      // Inside CREATE TRIGGER … BEGIN … END, semicolons end the body's statements, not the trigger.
      const inTrigger = /^\s*CREATE\s+(TEMP\w*\s+)?TRIGGER\b/i.test(current) && !/\bEND\s*$/i.test(current);
      if (inTrigger) current += c;
      else push();
      i++;
      continue;
    }
    current += c;
    i++;
  }
  push();
  return statements;
}

/** Runs every `*.sql` in `dir`, in name order (as wrangler's migration numbering sorts). Returns the file names. */
export async function applyMigrations(db, dir) {
  const files = readdirSync(dir).filter((f) => f.endsWith('.sql')).sort();
  for (const file of files) {
    const statements = splitSql(readFileSync(join(dir, file), 'utf8'));
    if (statements.length) await db.batch(statements.map((s) => db.prepare(s)));
  }
  return files;
}
